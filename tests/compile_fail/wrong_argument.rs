#[firebrand::job]
async fn double(n: u64) -> u64 {
    n * 2
}

async fn caller(pool: firebrand::Pool) {
    let _ = pool.call(&double, "twenty-one").await;
}

fn main() {}
