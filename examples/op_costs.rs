//! What one 8-lane instruction costs on this core, and which instructions compete for the same
//! execution ports: the arithmetic behind "Where the cycles go" in the README.
//!
//! Each measurement runs a loop of independent instructions (no dependency chains, nothing the
//! compiler can hoist: the loops are inline assembly) and reports nanoseconds per loop
//! iteration, best of 5 runs. A mix that costs the sum of its parts shares ports; one that
//! costs only its larger part runs on separate ports.
//!
//! `cargo run --release --example op_costs` (x86-64 with AVX2, FMA and F16C).

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::time::Instant;

    const ITERATIONS: u64 = 20_000_000;

    /// Runs `body` (one loop iteration) `ITERATIONS` times; returns ns per iteration, best of 5.
    fn best_of(body: unsafe fn(u64, *const u8)) -> f64 {
        let data = [0u8; 64];
        (0..5)
            .map(|_| {
                let start = Instant::now();
                // SAFETY: every body reads at most 32 bytes of `data` and touches only the
                // registers it declares; `main` checked the CPU features first.
                unsafe { body(ITERATIONS, data.as_ptr()) };
                start.elapsed().as_secs_f64() * 1e9 / ITERATIONS as f64
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// Declares a loop of `$n` iterations over the instructions `$body` (AT&T syntax; `{p}`
    /// is a pointer to readable bytes), clobbering every vector register.
    macro_rules! bench_loop {
        ($name:ident, $($body:literal),+) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $name(n: u64, p: *const u8) {
                // SAFETY: the loop reads at most 32 bytes from `p` (the caller's buffer) and
                // writes only the vector registers it declares clobbered.
                unsafe {
                    asm!(
                        "/* rows at {p} */",
                        "2:",
                        $($body,)+
                        "dec {n}",
                        "jnz 2b",
                        n = inout(reg) n => _,
                        p = in(reg) p,
                        out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                        out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
                        out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                        options(att_syntax, nostack, readonly),
                    );
                }
            }
        };
    }

    bench_loop!(
        fma6,
        "vfmadd231ps %ymm10, %ymm11, %ymm0",
        "vfmadd231ps %ymm10, %ymm11, %ymm1",
        "vfmadd231ps %ymm10, %ymm11, %ymm2",
        "vfmadd231ps %ymm10, %ymm11, %ymm3",
        "vfmadd231ps %ymm10, %ymm11, %ymm4",
        "vfmadd231ps %ymm10, %ymm11, %ymm5"
    );
    bench_loop!(
        maddubs6,
        "vpmaddubsw %ymm10, %ymm11, %ymm0",
        "vpmaddubsw %ymm10, %ymm11, %ymm1",
        "vpmaddubsw %ymm10, %ymm11, %ymm2",
        "vpmaddubsw %ymm10, %ymm11, %ymm3",
        "vpmaddubsw %ymm10, %ymm11, %ymm4",
        "vpmaddubsw %ymm10, %ymm11, %ymm5"
    );
    bench_loop!(
        maddwd6,
        "vpmaddwd %ymm10, %ymm11, %ymm0",
        "vpmaddwd %ymm10, %ymm11, %ymm1",
        "vpmaddwd %ymm10, %ymm11, %ymm2",
        "vpmaddwd %ymm10, %ymm11, %ymm3",
        "vpmaddwd %ymm10, %ymm11, %ymm4",
        "vpmaddwd %ymm10, %ymm11, %ymm5"
    );
    bench_loop!(
        cvtph6,
        "vcvtph2ps ({p}), %ymm0",
        "vcvtph2ps 16({p}), %ymm1",
        "vcvtph2ps ({p}), %ymm2",
        "vcvtph2ps 16({p}), %ymm3",
        "vcvtph2ps ({p}), %ymm4",
        "vcvtph2ps 16({p}), %ymm5"
    );
    // The int8 dot product's step (32 multiply-adds): bytes times bytes, then pairs widened.
    bench_loop!(
        int8_dot3,
        "vpmaddubsw %ymm10, %ymm11, %ymm6",
        "vpmaddwd %ymm6, %ymm9, %ymm6",
        "vpaddd %ymm6, %ymm0, %ymm0",
        "vpmaddubsw %ymm10, %ymm11, %ymm7",
        "vpmaddwd %ymm7, %ymm9, %ymm7",
        "vpaddd %ymm7, %ymm1, %ymm1",
        "vpmaddubsw %ymm10, %ymm11, %ymm8",
        "vpmaddwd %ymm8, %ymm9, %ymm8",
        "vpaddd %ymm8, %ymm2, %ymm2"
    );
    // Mixes with the 6 FMAs above.
    bench_loop!(
        fma6_maddubs3,
        "vpmaddubsw %ymm10, %ymm11, %ymm6",
        "vfmadd231ps %ymm10, %ymm11, %ymm0",
        "vfmadd231ps %ymm10, %ymm11, %ymm1",
        "vpmaddubsw %ymm10, %ymm11, %ymm7",
        "vfmadd231ps %ymm10, %ymm11, %ymm2",
        "vfmadd231ps %ymm10, %ymm11, %ymm3",
        "vpmaddubsw %ymm10, %ymm11, %ymm8",
        "vfmadd231ps %ymm10, %ymm11, %ymm4",
        "vfmadd231ps %ymm10, %ymm11, %ymm5"
    );
    bench_loop!(
        fma6_cvtph2,
        "vcvtph2ps ({p}), %ymm6",
        "vfmadd231ps %ymm10, %ymm11, %ymm0",
        "vfmadd231ps %ymm10, %ymm11, %ymm1",
        "vfmadd231ps %ymm10, %ymm11, %ymm2",
        "vcvtph2ps 16({p}), %ymm7",
        "vfmadd231ps %ymm10, %ymm11, %ymm3",
        "vfmadd231ps %ymm10, %ymm11, %ymm4",
        "vfmadd231ps %ymm10, %ymm11, %ymm5"
    );
    // int8 rows widened to f32 (the int8 value path), two chunks of 8.
    bench_loop!(
        fma6_int8_to_f32_2,
        "vpmovsxbd ({p}), %ymm6",
        "vcvtdq2ps %ymm6, %ymm6",
        "vfmadd231ps %ymm10, %ymm11, %ymm0",
        "vfmadd231ps %ymm10, %ymm11, %ymm1",
        "vfmadd231ps %ymm10, %ymm11, %ymm2",
        "vpmovsxbd 8({p}), %ymm7",
        "vcvtdq2ps %ymm7, %ymm7",
        "vfmadd231ps %ymm10, %ymm11, %ymm3",
        "vfmadd231ps %ymm10, %ymm11, %ymm4",
        "vfmadd231ps %ymm10, %ymm11, %ymm5"
    );

    pub fn main() {
        if !(is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        {
            println!("this example needs AVX2, FMA and F16C");
            return;
        }
        let fma = best_of(fma6) / 6.0;
        let maddubs = best_of(maddubs6) / 6.0;
        let maddwd = best_of(maddwd6) / 6.0;
        let cvtph = best_of(cvtph6) / 6.0;
        let dot = best_of(int8_dot3) / 3.0;
        let mix_int = best_of(fma6_maddubs3);
        let mix_cvt = best_of(fma6_cvtph2);
        let mix_i8 = best_of(fma6_int8_to_f32_2);
        println!("ns per 8-lane (ymm) instruction, independent, best of 5 runs:");
        println!(
            "  vfmadd231ps  {fma:.3}   ({:.1} multiply-adds per ns)",
            8.0 / fma
        );
        println!(
            "  vpmaddubsw   {maddubs:.3}   ({:.1} byte multiply-adds per ns, i16 pair sums)",
            32.0 / maddubs
        );
        println!("  vpmaddwd     {maddwd:.3}");
        println!("  vcvtph2ps    {cvtph:.3}   (f16 -> f32, from memory)");
        println!(
            "  int8 dot step (maddubs + maddwd + add): {dot:.3} per 32 multiply-adds ({:.1} per ns)",
            32.0 / dot
        );
        println!("mixes, ns per iteration (sum of parts if they share ports):");
        println!(
            "  6 FMA + 3 vpmaddubsw           {mix_int:.2}   (parts {:.2} + {:.2})",
            6.0 * fma,
            3.0 * maddubs
        );
        println!(
            "  6 FMA + 2 vcvtph2ps            {mix_cvt:.2}   (parts {:.2} + {:.2})",
            6.0 * fma,
            2.0 * cvtph
        );
        println!(
            "  6 FMA + 2 int8 -> f32 chunks   {mix_i8:.2}   (6 FMA alone {:.2})",
            6.0 * fma
        );
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    x86::main();
    #[cfg(not(target_arch = "x86_64"))]
    println!("this example measures x86-64 instructions");
}
