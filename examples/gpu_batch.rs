//! A GPU batch job: `pool.map` over a batch of chunks on runners that each own their GPUs,
//! every chunk a CUDA kernel launch checked against the CPU.
//!
//! ```sh
//! # One runner per local GPU (the local backend's gpus_per_runner), each seeing only its own:
//! cargo run --release --features cuda --example gpu_batch
//! # Runner pods with one nvidia.com/gpu each, from inside a cluster (docs/kubernetes.md):
//! cargo run --release --features cuda,kubernetes --example gpu_batch -- --kubernetes --runners 4
//! ```
//!
//! Options: `--gpus-per-runner N` (1), `--runners N` (Kubernetes only: how many pods; local
//! runs use every GPU), `--chunks N` (32), `--elements N` per chunk (1,048,576), `--iters N`
//! fused multiply-adds per element (65,536).
//!
//! The kernel is PTX loaded through the CUDA driver at run time (cudarc, no toolkit needed to
//! build). Where there is no GPU, the example says so and exits; built without the `cuda`
//! feature, it says that instead.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use firebrand::{job, Backend as _, LocalBackend, Pool};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Chunk {
    index: u32,
    elements: u32,
    iters: u32,
}

/// What a runner did with a chunk, and on which GPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Burned {
    index: u32,
    pid: u32,
    /// `CUDA_VISIBLE_DEVICES` (local backend) or `NVIDIA_VISIBLE_DEVICES` (device plugin).
    visible: String,
    gpu: String,
    gpu_uuid: String,
    kernel: Duration,
    checksum: f64,
}

/// One chunk of the batch: `elements` values, each run through `iters` fused multiply-adds.
#[job(idempotent)]
fn burn(chunk: Chunk) -> Result<Burned, String> {
    let (gpu, gpu_uuid, kernel, checksum) = gpu::burn(&chunk)?;
    let visible = ["CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"]
        .iter()
        .find_map(|name| std::env::var(name).ok())
        .unwrap_or_else(|| "(all)".into());
    Ok(Burned {
        index: chunk.index,
        pid: std::process::id(),
        visible,
        gpu,
        gpu_uuid,
        kernel,
        checksum,
    })
}

#[cfg(feature = "cuda")]
mod gpu {
    //! The kernel, on the runner's one visible GPU: a context made once per runner process.

    use std::sync::{Arc, OnceLock};
    use std::time::{Duration, Instant};

    use cudarc::driver::{CudaContext, CudaFunction, LaunchConfig, PushKernelArg as _};

    use super::Chunk;

    /// The recurrence the kernel runs, converging to 10: `x = x * A + B`; the kernel has
    /// them as `0f3F7FBE77` and `0f3C23D70A`.
    const A: f32 = 0.999;
    const B: f32 = 0.01;
    // The kernel's literals are these constants, bit for bit.
    const _: () = assert!(A.to_bits() == 0x3F7F_BE77 && B.to_bits() == 0x3C23_D70A);

    /// The value element `i` ends at, computed as the GPU does (one rounding per fused step).
    fn reference(i: u32, iters: u32) -> f32 {
        let mut x = i as f32 / 1024.0;
        for _ in 0..iters {
            x = x.mul_add(A, B);
        }
        x
    }

    /// `out[i] = (i / 1024)` run through `iters` steps of `x = fma(x, 0.999, 0.01)`. ptxas 12.9
    /// assembles it for sm_52, sm_80 and sm_90 (6 to 10 registers, no spills); the driver
    /// compiles it for the GPU at hand when the module loads.
    const PTX: &str = r#"
.version 7.0
.target sm_52
.address_size 64

.visible .entry burn(.param .u64 out, .param .u32 n, .param .u32 iters)
{
    .reg .pred %p<3>;
    .reg .b32 %r<8>;
    .reg .f32 %f<2>;
    .reg .b64 %rd<4>;

    ld.param.u64 %rd1, [out];
    ld.param.u32 %r1, [n];
    ld.param.u32 %r2, [iters];
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %ntid.x;
    mov.u32 %r5, %tid.x;
    mad.lo.u32 %r6, %r3, %r4, %r5;
    setp.ge.u32 %p1, %r6, %r1;
    @%p1 bra DONE;
    cvt.rn.f32.u32 %f1, %r6;
    mul.rn.f32 %f1, %f1, 0f3A800000;
    mov.u32 %r7, 0;
LOOP:
    setp.ge.u32 %p2, %r7, %r2;
    @%p2 bra STORE;
    fma.rn.f32 %f1, %f1, 0f3F7FBE77, 0f3C23D70A;
    add.u32 %r7, %r7, 1;
    bra LOOP;
STORE:
    cvta.to.global.u64 %rd2, %rd1;
    mul.wide.u32 %rd3, %r6, 4;
    add.s64 %rd2, %rd2, %rd3;
    st.global.f32 [%rd2], %f1;
DONE:
    ret;
}
"#;

    struct Device {
        context: Arc<CudaContext>,
        burn: CudaFunction,
        name: String,
        uuid: String,
    }

    fn device() -> Result<&'static Device, String> {
        static DEVICE: OnceLock<Result<Device, String>> = OnceLock::new();
        DEVICE
            .get_or_init(|| {
                // SAFETY: loading libcuda runs its initialisers, as any CUDA program does; the
                // check only avoids cudarc's panic when the library is absent.
                if !unsafe { cudarc::driver::sys::is_culib_present() } {
                    return Err("no CUDA driver on this runner (libcuda.so not found)".into());
                }
                let context = CudaContext::new(0).map_err(|e| format!("no usable GPU: {e}"))?;
                let name = context.name().map_err(|e| e.to_string())?;
                let uuid = context.uuid().map_err(|e| e.to_string())?;
                let uuid = uuid
                    .bytes
                    .iter()
                    .map(|b| format!("{:02x}", *b as u8))
                    .collect::<String>();
                let module = context
                    .load_module(cudarc::nvrtc::Ptx::from_src(PTX))
                    .map_err(|e| format!("the driver refused the kernel: {e}"))?;
                let burn = module.load_function("burn").map_err(|e| e.to_string())?;
                Ok(Device {
                    context,
                    burn,
                    name,
                    uuid: format!("GPU-{uuid}"),
                })
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Runs the chunk's kernel; checks three elements against the CPU.
    pub fn burn(chunk: &Chunk) -> Result<(String, String, Duration, f64), String> {
        let device = device()?;
        let stream = device.context.default_stream();
        let mut out = stream
            .alloc_zeros::<f32>(chunk.elements as usize)
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut launch = stream.launch_builder(&device.burn);
        launch.arg(&mut out).arg(&chunk.elements).arg(&chunk.iters);
        // SAFETY: the kernel's parameters are (u64 pointer, u32, u32) as pushed, and it writes
        // only out[0..n), which `out` holds.
        unsafe { launch.launch(LaunchConfig::for_num_elems(chunk.elements)) }
            .map_err(|e| e.to_string())?;
        stream.synchronize().map_err(|e| e.to_string())?;
        let kernel = started.elapsed();
        let values = stream.clone_dtoh(&out).map_err(|e| e.to_string())?;
        for i in [0, chunk.elements / 2, chunk.elements - 1] {
            let (gpu, cpu) = (values[i as usize], reference(i, chunk.iters));
            if gpu.to_bits() != cpu.to_bits() {
                return Err(format!("element {i}: the GPU gave {gpu}, the CPU {cpu}"));
            }
        }
        let checksum = values.iter().map(|v| f64::from(*v)).sum();
        Ok((device.name.clone(), device.uuid.clone(), kernel, checksum))
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    use std::time::Duration;

    use super::Chunk;

    pub fn burn(_: &Chunk) -> Result<(String, String, Duration, f64), String> {
        Err(super::NO_CUDA.into())
    }
}

const NO_CUDA: &str = "gpu_batch was built without the `cuda` feature, so it has no kernel to \
    run: cargo run --release --features cuda --example gpu_batch";

struct Options {
    kubernetes: bool,
    gpus_per_runner: usize,
    runners: usize,
    chunks: u32,
    elements: u32,
    iters: u32,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        kubernetes: false,
        gpus_per_runner: 1,
        runners: 2,
        chunks: 32,
        elements: 1 << 20,
        iters: 65_536,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || -> anyhow::Result<u64> {
            let value = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a value"))?;
            Ok(value.parse()?)
        };
        match arg.as_str() {
            "--kubernetes" => options.kubernetes = true,
            "--gpus-per-runner" => options.gpus_per_runner = value()?.try_into()?,
            "--runners" => options.runners = value()?.try_into()?,
            "--chunks" => options.chunks = value()?.try_into()?,
            "--elements" => options.elements = value()?.try_into()?,
            "--iters" => options.iters = value()?.try_into()?,
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    anyhow::ensure!(
        options.gpus_per_runner > 0 && options.elements > 0,
        "sizes must be above zero"
    );
    Ok(options)
}

fn main() -> anyhow::Result<()> {
    // A runner serves chunks here and exits; the parent carries on.
    firebrand::run_if_child();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let options = options()?;
    tokio::runtime::Runtime::new()?.block_on(parent(options))
}

async fn parent(options: Options) -> anyhow::Result<()> {
    let builder = Pool::builder()
        .min(0)
        .max_concurrency(1)
        .boot_timeout(Duration::from_secs(300))
        .timeout(Duration::from_secs(300));
    let pool = if options.kubernetes {
        kubernetes_pool(builder, &options).await?
    } else {
        let backend = LocalBackend::builder()
            .gpus_per_runner(options.gpus_per_runner)
            .build();
        let Some(runners) = backend.max_runners().filter(|n| *n > 0) else {
            println!(
                "gpu_batch: no GPU here: `nvidia-smi -L` lists none (or is not installed), so \
                 there is nothing to run the batch on. Run it on a machine with NVIDIA GPUs and \
                 their driver, or in a cluster with GPU nodes with --kubernetes."
            );
            return Ok(());
        };
        println!(
            "gpu_batch: {runners} local runners, {} GPU(s) each",
            options.gpus_per_runner
        );
        // The pool's `max` is the backend's capacity: one runner per GPU (or group).
        builder.backend(backend).build().await?
    };
    if !cfg!(feature = "cuda") {
        println!("{NO_CUDA}");
        pool.shutdown().await;
        return Ok(());
    }
    let (elements, iters) = (options.elements, options.iters);
    let chunks = (0..options.chunks).map(move |index| Chunk {
        index,
        elements,
        iters,
    });
    let started = Instant::now();
    let results = pool.map(&burn, chunks).outputs().await;
    let wall = started.elapsed();
    pool.shutdown().await;
    let results = results?;
    report(&options, &results, wall)
}

#[cfg(feature = "kubernetes")]
async fn kubernetes_pool(
    builder: firebrand::PoolBuilder,
    options: &Options,
) -> anyhow::Result<Pool> {
    use firebrand::backend::kubernetes::KubernetesBackend;
    let backend = KubernetesBackend::builder()
        .gpus(options.gpus_per_runner.try_into()?)
        .build()
        .await?;
    println!(
        "gpu_batch: up to {} runner pods with {} GPU(s) each, image {}",
        options.runners,
        options.gpus_per_runner,
        backend.image()
    );
    Ok(builder
        .backend(backend)
        .max(options.runners)
        .build()
        .await?)
}

#[cfg(not(feature = "kubernetes"))]
async fn kubernetes_pool(_: firebrand::PoolBuilder, _: &Options) -> anyhow::Result<Pool> {
    anyhow::bail!("--kubernetes needs the `kubernetes` feature: --features cuda,kubernetes")
}

/// Per runner: the GPU it saw, its chunks and throughput; and the check that no two runners
/// shared a GPU.
fn report(options: &Options, results: &[Burned], wall: Duration) -> anyhow::Result<()> {
    let mut by_runner: BTreeMap<u32, Vec<&Burned>> = BTreeMap::new();
    for burned in results {
        by_runner.entry(burned.pid).or_default().push(burned);
    }
    let fmas_per_chunk = f64::from(options.elements) * f64::from(options.iters);
    println!("runner pid | visible devices | GPU | uuid | chunks | kernel time | G FMA/s");
    let mut owners: BTreeMap<&str, u32> = BTreeMap::new();
    for (pid, chunks) in &by_runner {
        let first = chunks[0];
        let kernel: Duration = chunks.iter().map(|c| c.kernel).sum();
        let rate = fmas_per_chunk * chunks.len() as f64 / kernel.as_secs_f64() / 1e9;
        println!(
            "{pid} | {} | {} | {} | {} | {kernel:.2?} | {rate:.1}",
            first.visible,
            first.gpu,
            first.gpu_uuid,
            chunks.len()
        );
        for chunk in chunks {
            anyhow::ensure!(
                chunk.gpu_uuid == first.gpu_uuid,
                "runner {pid} saw two GPUs"
            );
        }
        if let Some(other) = owners.insert(&first.gpu_uuid, *pid) {
            anyhow::bail!("runners {other} and {pid} shared GPU {}", first.gpu_uuid);
        }
    }
    // Every chunk computes the same values: their sums must agree to the last bit.
    let checksums: std::collections::BTreeSet<u64> =
        results.iter().map(|r| r.checksum.to_bits()).collect();
    anyhow::ensure!(checksums.len() == 1, "chunks disagree: {checksums:?}");
    println!(
        "{} chunks on {} runners, no GPU shared, every chunk checked; {:.1?} wall, {:.1} G FMA/s in all",
        results.len(),
        by_runner.len(),
        wall,
        fmas_per_chunk * results.len() as f64 / wall.as_secs_f64() / 1e9,
    );
    Ok(())
}
