#[firebrand::job]
async fn resize(width: u32) -> u32 {
    width
}

#[firebrand::job]
async fn resize(width: u32, height: u32) -> u32 {
    width * height
}

fn main() {}
