//! How fast does reshardfs' S3 client read an object? Downloads
//! `s3://BUCKET/KEY` in parts of PART MiB with THREADS requests in flight
//! (each a conditional ranged GET, as the byte engine sends them), into
//! memory, and prints the throughput: the client's share of what the
//! benchmark's object-store rows measure.
//!
//!   cargo run --release --example s3_get -- s3://BUCKET/KEY [THREADS] [PART_MIB]
//!
//! Credentials and endpoint as for `reshardfs` (AWS_* variables, ~/.aws).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use reshardfs::checkpoint::s3::client::{Client, Retry};
use reshardfs::checkpoint::s3::store::Backend;
use reshardfs::checkpoint::s3::{Location, creds};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .ok_or("usage: s3_get s3://BUCKET/KEY [THREADS] [PART_MIB]")?;
    let threads: usize = args.get(2).map_or(Ok(8), |s| s.parse())?;
    let part: u64 = args.get(3).map_or(Ok(8), |s| s.parse())? << 20;
    let loc = Location::parse(url).ok_or("not an s3:// URL")??;
    let settings = creds::settings(&creds::process_env, false, None)?;
    let client = Arc::new(Client::new(&loc.bucket, &settings, Retry::default(), None)?);
    let obj = client.head(&loc.prefix)?;
    let parts = obj.size.div_ceil(part);
    let next = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (client, next, obj, key) = (
                client.clone(),
                next.clone(),
                obj.clone(),
                loc.prefix.clone(),
            );
            std::thread::spawn(move || {
                let mut buf = vec![0u8; part as usize];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= parts {
                        return Ok::<(), String>(());
                    }
                    let off = i * part;
                    let n = part.min(obj.size - off) as usize;
                    client
                        .get_range(&key, &obj.etag, off, &mut buf[..n])
                        .map_err(|e| e.to_string())?;
                }
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "a worker panicked")??;
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "{} bytes in {s:.3} s: {:.0} MiB/s ({threads} in flight, {} MiB parts, {} requests, {} retries)",
        obj.size,
        obj.size as f64 / s / (1 << 20) as f64,
        part >> 20,
        client.counters.requests.load(Ordering::Relaxed),
        client.counters.retries.load(Ordering::Relaxed)
    );
    Ok(())
}
