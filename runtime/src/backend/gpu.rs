//! GPUs on this machine, handed out to local runners so that no two share one.

use std::collections::BTreeSet;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// The variable that tells CUDA (and most GPU frameworks) which GPUs a process may use.
pub const VISIBLE_DEVICES_ENV: &str = "CUDA_VISIBLE_DEVICES";

/// The GPUs a local backend hands out, and those it has handed out.
#[derive(Debug)]
pub(crate) struct GpuSet {
    all: Vec<String>,
    free: Mutex<BTreeSet<usize>>,
    returned: Notify,
}

impl GpuSet {
    pub(crate) fn new(gpus: Vec<String>) -> Self {
        let free = (0..gpus.len()).collect();
        Self {
            all: gpus,
            free: Mutex::new(free),
            returned: Notify::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.all.len()
    }

    /// Takes `count` GPUs, waiting for a runner that is ending to give its GPUs back.
    pub(crate) async fn take(self: &Arc<Self>, count: usize) -> GpuLease {
        loop {
            let returned = self.returned.notified();
            {
                let mut free = self.free.lock();
                if free.len() >= count {
                    let taken: Vec<usize> = free.iter().copied().take(count).collect();
                    for index in &taken {
                        free.remove(index);
                    }
                    return GpuLease {
                        set: Arc::clone(self),
                        taken,
                    };
                }
            }
            returned.await;
        }
    }
}

/// GPUs held by one runner; dropping the lease gives them back.
#[derive(Debug)]
pub(crate) struct GpuLease {
    set: Arc<GpuSet>,
    taken: Vec<usize>,
}

impl GpuLease {
    /// The value of `CUDA_VISIBLE_DEVICES` for the runner.
    pub(crate) fn visible_devices(&self) -> String {
        let names: Vec<&str> = self
            .taken
            .iter()
            .map(|&i| self.set.all[i].as_str())
            .collect();
        names.join(",")
    }
}

impl Drop for GpuLease {
    fn drop(&mut self) {
        self.set.free.lock().extend(self.taken.drain(..));
        self.set.returned.notify_waiters();
    }
}

/// The GPUs `nvidia-smi -L` lists, by index; none where it is missing or fails.
pub(crate) fn detect() -> Vec<String> {
    match std::process::Command::new("nvidia-smi").arg("-L").output() {
        Ok(output) if output.status.success() => {
            parse_nvidia_smi(&String::from_utf8_lossy(&output.stdout))
        }
        _ => Vec::new(),
    }
}

/// Indices from lines like `GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-…)`.
fn parse_nvidia_smi(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|line| line.strip_prefix("GPU ")?.split_once(':'))
        .filter(|(index, _)| index.parse::<u32>().is_ok())
        .map(|(index, _)| index.to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_indices_from_nvidia_smi() {
        let listing = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5d3c…)\n\
                       GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-9a1b…)\n\
                       MIG 1g.10gb Device 0: (UUID: MIG-…)\n";
        assert_eq!(parse_nvidia_smi(listing), ["0", "1"]);
        assert!(parse_nvidia_smi("No devices were found").is_empty());
    }

    #[tokio::test]
    async fn a_gpu_is_never_held_twice_and_comes_back_when_released() {
        let set = Arc::new(GpuSet::new(["0", "1", "2"].map(String::from).to_vec()));
        let first = set.take(2).await;
        assert_eq!(first.visible_devices(), "0,1");
        let waiting = tokio::spawn({
            let set = Arc::clone(&set);
            async move { set.take(2).await.visible_devices() }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "only one GPU is free");
        drop(first);
        assert_eq!(waiting.await.unwrap(), "0,1");
    }
}
