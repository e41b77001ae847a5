//! How fast can a cold source file be read, by `pread` or through a memory
//! map? The figures are in docs/PERFORMANCE.md.
//! `scripts/bench_prefetch_ab.py --raw` drops the page cache before each run
//! and interleaves the modes, on the local disk and through sshfs.
//!
//!     cargo run --release --example cold_read -- MODE FILE [BLOCK_KIB]
//!
//! MODE: `pread` (read each block into one reused buffer), `pread-reopen`
//! (the same with a fresh descriptor per block), `mmap` (copy each
//! block out of a private read-only map; the kernel's fault-around and
//! readahead fetch the pages), `mmap-willneed` (the same, with
//! `MADV_WILLNEED` on the next 16 MiB before each block, one call: the
//! kernel reads at most one readahead window of it), `mmap-willneed-chunks`
//! (the same advice given 128 KiB at a time, the default window, so that
//! every window of the 16 MiB is asked for), `mmap-seq` (the map with `MADV_SEQUENTIAL`: faults read ahead as
//! `read` does, instead of around the faulting page). Prints `MODE seconds GB/s`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, path, rest @ ..] = args.as_slice() else {
        return Err(
            "usage: cold_read pread|pread-reopen|mmap|mmap-willneed|mmap-willneed-chunks|mmap-seq FILE [BLOCK_KIB]"
                .into(),
        );
    };
    let block = rest.first().map_or(Ok(1024), |b| b.parse::<usize>())? << 10;
    let file = File::open(path)?;
    let len = file.metadata()?.len() as usize;
    let mut buf = vec![0u8; block];
    let mut sum = 0u64;
    let t = Instant::now();
    match mode.as_str() {
        "pread" => {
            let mut at = 0;
            while at < len {
                let n = block.min(len - at);
                file.read_exact_at(&mut buf[..n], at as u64)?;
                sum = sum.wrapping_add(buf[0] as u64);
                at += n;
            }
        }
        "pread-reopen" => {
            // A fresh descriptor per block: the kernel's readahead state
            // lives in the open file, so this shows what it is worth.
            let mut at = 0;
            while at < len {
                let n = block.min(len - at);
                File::open(path)?.read_exact_at(&mut buf[..n], at as u64)?;
                sum = sum.wrapping_add(buf[0] as u64);
                at += n;
            }
        }
        "mmap" | "mmap-willneed" | "mmap-willneed-chunks" | "mmap-seq" => {
            // SAFETY: a read-only private map of a file nobody truncates
            // while this measurement runs.
            let map = unsafe { memmap2::Mmap::map(&file)? };
            if mode == "mmap-seq" {
                map.advise(memmap2::Advice::Sequential)?;
            }
            let ahead = 16 << 20;
            let mut advised = 0;
            let mut at = 0;
            while at < len {
                let n = block.min(len - at);
                if mode.starts_with("mmap-willneed") && at + ahead > advised && advised < len {
                    let end = (at + 2 * ahead).min(len);
                    let step = if mode == "mmap-willneed" {
                        end - advised
                    } else {
                        128 << 10
                    };
                    for s in (advised..end).step_by(step) {
                        map.advise_range(memmap2::Advice::WillNeed, s, step.min(end - s))?;
                    }
                    advised = end;
                }
                buf[..n].copy_from_slice(&map[at..at + n]);
                sum = sum.wrapping_add(buf[0] as u64);
                at += n;
            }
        }
        other => return Err(format!("unknown mode {other}").into()),
    }
    let s = t.elapsed().as_secs_f64();
    println!("{mode} {s:.3} {:.2} (checksum {sum})", len as f64 / s / 1e9);
    Ok(())
}
