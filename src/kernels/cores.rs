//! Whose cores the kernels run on, for the two layout choices of the register-blocked product
//! ([`super::pointwise`]) that measured opposite ways on the two machines sepconv is tuned on:
//! a 2-vCPU AMD EPYC VM (Zen 4: 32 KiB L1 and 1 MiB L2 per core, two 256-bit FMA pipes) and a
//! 2-vCPU Intel Xeon VM (Emerald Rapids: 48 KiB L1 and 2 MiB L2 per core, two 512-bit FMA
//! units). Every other choice measured the same way on both, or was measured on one only.

use std::sync::OnceLock;

/// The CPU vendor's cores, as far as the kernels' choices go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cores {
    /// AMD's (and Hygon's, the same Zen cores).
    Amd,
    /// Intel's, and those of any other vendor or architecture: the choices measured on Intel's.
    Intel,
}

impl Cores {
    /// This CPU's, read once: on a VM every CPUID instruction traps to the hypervisor, which
    /// takes microseconds, and the products ask on every call.
    pub fn detect() -> Cores {
        static CORES: OnceLock<Cores> = OnceLock::new();
        *CORES.get_or_init(read_vendor)
    }

    /// Whether a register-blocked product whose D rows start on many cache lines copies each
    /// column block of them into one aligned panel first (`pointwise::packs`). On Intel's
    /// cores the copy paid (reference layer D's pointwise forward 5.94 → 5.61 ms, C's 3 × 1
    /// 8–15%: line-splitting loads and rows that fall out of L1 cost more than the copy); on
    /// Zen 4, the two ways switched in one process (harness, 2 threads, min of 5–30 per round,
    /// 3–5 rounds), it lost on reference layer E's implicit GEMMs: at batch 1 its 1 × 3
    /// half's grad-weight 0.83–0.86 → 0.80 ms unpacked, its 3 × 1 half's grad-input
    /// 0.89–0.91 → 0.83–0.85, its 3 × 3's grad-weight 2.39–2.42 → 2.23–2.28; at batch 8
    /// its spatially separable training step 38.2–39.3 → 37.6–38.6, its 3 × 3 forward
    /// 18.3–18.7 → 17.9–18.1, its pointwise training step 5.69–5.91 → 5.59–5.75; C's and D's
    /// products tied (D's pointwise forward 3.73–3.84 packed, 3.76–3.86 not).
    pub fn packs_deep_panels(self) -> bool {
        self == Cores::Intel
    }

    /// Whether a pointwise grad-input with AVX-512 reads a row-major copy of its weight from
    /// K = 512 output channels instead of the weight in place, column-wise
    /// (`pointwise::wants_row_major_c`). On Intel's cores the column-wise read cost more (D's
    /// grad-input 3.46–3.95 → 2.94–3.00 ms with the copy); on Zen 4 it is the copy that costs,
    /// with the panels packed or not (before packing existed there, D's grad-input measured
    /// 3.99–4.07 ms reading the weight in place, 4.25–4.46 with the copy). The harness above,
    /// the panels still packed: at batch 1 reference layer D's pointwise training step
    /// 1.53–1.55 ms with the copy against 1.42–1.44 without, its depthwise-separable one
    /// 1.65–1.69 against 1.53–1.56; at batch 8 11.9–12.2 against 11.8–12.4 and 12.7–13.5
    /// against 12.4–12.9.
    pub fn copies_deep_transposed_weights(self) -> bool {
        self == Cores::Intel
    }
}

/// The vendor string of CPUID leaf 0.
fn read_vendor() -> Cores {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID is available on every x86-64 CPU.
        #[allow(unused_unsafe)]
        let leaf = unsafe { std::arch::x86_64::__cpuid(0) };
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&leaf.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&leaf.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&leaf.ecx.to_le_bytes());
        if &vendor == b"AuthenticAMD" || &vendor == b"HygonGenuine" {
            return Cores::Amd;
        }
    }
    Cores::Intel
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_the_vendor_of_proc_cpuinfo() {
        // An independent reading of the same fact: the kernel's vendor_id line.
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            return;
        };
        let Some(line) = info.lines().find(|l| l.starts_with("vendor_id")) else {
            return;
        };
        let amd = line.contains("AuthenticAMD") || line.contains("HygonGenuine");
        assert_eq!(Cores::detect() == Cores::Amd, amd, "{line}");
        assert_eq!(Cores::detect(), Cores::detect());
    }
}
