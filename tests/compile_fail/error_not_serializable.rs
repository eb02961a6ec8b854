#[derive(Debug)]
pub struct DiskFull;

impl std::fmt::Display for DiskFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("disk full")
    }
}

#[firebrand::job]
async fn save(bytes: Vec<u8>) -> Result<usize, DiskFull> {
    Ok(bytes.len())
}

fn main() {}
