//! Prints every GEMM candidate the model considers for one shape, fastest first.
//! `cargo run --release --example explain_gemm -- h100 bf16 4096 4096 4096`
use waferscale::gpu::gemm::{explain_gemm, GemmShape};
use waferscale::hw::{load_with_overrides, GpuSystem};
use waferscale::model::DType;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 6 {
        eprintln!("usage: explain_gemm HW DTYPE M N K [BATCH]");
        std::process::exit(2);
    }
    let sys = match load_with_overrides(&a[1], &[]).and_then(|d| GpuSystem::from_doc(&d)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let num = |s: &str| s.parse::<u64>().unwrap_or(1);
    let dtype = DType::parse(&a[2]).unwrap_or(DType::Bf16);
    let (n, k) = (num(&a[4]), num(&a[5]));
    let shape = GemmShape {
        batch: a.get(6).map_or(1, |s| num(s)),
        m: num(&a[3]),
        n,
        k,
        dtype,
        // Row-major operands: N and K are the leading dimensions.
        aligned: GemmShape::aligned_dim(n, dtype) && GemmShape::aligned_dim(k, dtype),
    };
    for (cfg, s) in explain_gemm(&sys.gpu, &shape).iter().take(25) {
        println!("{:>10.2} us  {:>7.1} TF  {cfg}", s * 1e6, shape.flops() / s / 1e12);
    }
}
