#[firebrand::job(timeout = "soon")]
async fn a() {}

#[firebrand::job(retries = 3)]
async fn b() {}

#[firebrand::job(priority = 1)]
async fn c() {}

#[firebrand::job]
async fn d<T>(value: T) {}

fn main() {}
