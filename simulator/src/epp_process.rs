//! A real `epp` process for the load harnesses: the binary built next to `epp-sim`, started
//! with the given flags (optionally pinned to CPUs), killed on drop. A separate process keeps
//! the EPP's CPU and memory apart from the load generator's, so both can be read from `/proc`.
//! The process gets the image's malloc settings ([`GLIBC_TUNABLES`]) unless the caller's
//! environment sets its own, so that the numbers are those of the shipped container.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use anyhow::Context;

/// The `GLIBC_TUNABLES` value of the shipped image (see the Dockerfile).
pub const GLIBC_TUNABLES: &str = "glibc.malloc.trim_threshold=67108864:glibc.malloc.mmap_threshold=4194304";

/// A running `epp`.
pub struct EppProcess {
    child: Child,
}

impl EppProcess {
    /// Start `epp` with `flags`, pinned to `cpus` (a `taskset -c` list) when given.
    ///
    /// # Errors
    /// When the binary is missing or cannot start.
    pub fn start(flags: &[String], cpus: Option<&str>) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let epp: PathBuf = exe.parent().context("binary dir")?.join("epp");
        let mut command = match cpus {
            Some(cpus) => {
                // taskset execs the EPP: the pid stays the EPP's.
                let mut c = Command::new("taskset");
                c.args(["-c", cpus]).arg(&epp);
                c
            }
            None => Command::new(&epp),
        };
        if std::env::var_os("GLIBC_TUNABLES").is_none() {
            command.env("GLIBC_TUNABLES", GLIBC_TUNABLES);
        }
        let child = command
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("the epp binary must be built next to epp-sim (cargo build --release --workspace)")?;
        Ok(Self { child })
    }

    /// The process id (for `/proc/<pid>`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for EppProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_harness_uses_the_images_malloc_settings() {
        let dockerfile = include_str!("../../Dockerfile");
        assert!(
            dockerfile
                .lines()
                .any(|l| l.trim() == format!("ENV GLIBC_TUNABLES={}", super::GLIBC_TUNABLES)),
            "Dockerfile and epp_process::GLIBC_TUNABLES differ"
        );
    }
}
