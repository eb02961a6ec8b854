pub struct Model(Vec<f32>);
pub struct Cache(Vec<u64>);

#[firebrand::job(resource)]
async fn load_model(size: usize) -> Model {
    Model(vec![0.0; size])
}

#[firebrand::job]
async fn lookup(cache: &Cache, index: usize) -> Option<u64> {
    cache.0.get(index).copied()
}

async fn caller(pool: firebrand::Pool) -> Result<(), firebrand::CallError> {
    let model = pool.resource(&load_model, 16).await?;
    // A job that runs with a `Cache`, called on a `Model`.
    let _ = model.call(&lookup, 3).await;
    // A job that needs its resource, called without one.
    let _ = pool.call(&lookup, 3).await;
    Ok(())
}

fn main() {}
