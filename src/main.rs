//! The `reshardfs` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use reshardfs::checkpoint::source::Source;
use reshardfs::export::{ExportOptions, export};
use reshardfs::mount::daemon;
use reshardfs::mount::prefetch::PrefetchConfig;
use reshardfs::mount::serve::Server;
use reshardfs::report;
use reshardfs::reshard::plan::Plan;
use reshardfs::reshard::target::TargetSpec;
use reshardfs::{Result, bail};

/// Distributed checkpoints, resharded on the fly.
///
/// reshardfs shows a MindSpore Transformers Checkpoint 2.0 checkpoint as it
/// would look had it been saved with another parallel strategy: the same
/// tensors, sliced for the target's ranks, in ordinary safetensors files with
/// a matching metadata.json.
///
/// Exit codes: 0 success, 2 bad input (checkpoint or target), 1 other failure.
#[derive(Parser)]
#[command(name = "reshardfs", version, about, long_about)]
struct Cli {
    /// Log level: error, warn, info, debug or trace (default: RUST_LOG, else warn).
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a checkpoint: iterations, world size, stages, and per tensor its
    /// dtype, shape, layout, slices and files.
    Inspect {
        /// Checkpoint root (with latest_checkpointed_iteration.txt), one
        /// iteration folder, or a folder of plain safetensors files.
        src: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the view a target gives: every file with its size and tensors,
    /// where each tensor's bytes come from, and totals.
    Plan {
        /// Checkpoint root, iteration folder, or plain safetensors folder.
        src: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the view to DEST, with the same tree a mount shows.
    Export {
        /// Checkpoint root, iteration folder, or plain safetensors folder.
        src: PathBuf,
        /// Destination folder (created if missing; must be empty unless --force).
        dest: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        /// Write into a non-empty DEST, replacing files of the same names and
        /// removing rank files of an earlier view that this view does not have.
        #[arg(long)]
        force: bool,
        /// Files written in parallel (default: the number of CPUs).
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
        /// Never draw a progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Mount the view read-only at MNT; bytes are computed when read.
    ///
    /// Returns once the mount is live (or fails, leaving nothing mounted)
    /// and serves from a background process until `umount MNT`. Without a
    /// target the view has the source's own strategy. A `.reshardfs/` folder
    /// at the mount's root shows each file's plan and live counters.
    Mount {
        /// Checkpoint root, iteration folder, or plain safetensors folder.
        src: PathBuf,
        /// An existing directory (what it holds is hidden while mounted).
        mnt: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        /// Stay attached and log to stderr; SIGINT/SIGTERM/SIGHUP unmount.
        #[arg(long)]
        foreground: bool,
        /// Block cache budget, e.g. 512M or 2G. Never exceeded: blocks are at
        /// most a quarter of it (and at most 1 MiB).
        #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
        cache_size: u64,
        /// How far ahead of a sequential reader view bytes are computed
        /// (and their source asked of the disk); at most half the cache.
        #[arg(long, value_name = "SIZE", default_value = "16M", value_parser = parse_size)]
        prefetch_window: u64,
        /// Compute nothing ahead of readers.
        #[arg(long)]
        no_prefetch: bool,
        /// FUSE request threads (default: the number of CPUs, at least 2).
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
        /// Let other users read the mount (default: only the mounting user).
        #[arg(long)]
        allow_other: bool,
        /// Append the background daemon's log to FILE.
        #[arg(long, value_name = "FILE")]
        log_file: Option<PathBuf>,
        /// Benchmarks only: view files read as zeros (FUSE cost alone).
        #[arg(long, hide = true)]
        serve_zeros: bool,
    },
}

/// Parses `1048576`, `64K`, `512M`, `2G`, `1GiB`, `1.5G` into bytes.
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512M or 2G"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use K, M, G or T")),
    };
    Ok((n * mult as f64) as u64)
}

/// The target strategy. Give --mesh and/or --pp, or --strategy, or --unshard.
#[derive(Args)]
struct TargetArgs {
    /// New sizes for named device axes, e.g. `tp=2` or `dp=1,tp=4`. Every
    /// tensor keeps its alias names and tensor map; axes not named keep their
    /// size. Repeatable.
    #[arg(long, value_name = "ALIAS=N[,ALIAS=N...]", conflicts_with_all = ["strategy", "unshard"])]
    mesh: Vec<String>,
    /// Number of pipeline stages: layer i of L goes to stage i*N/L; other
    /// tensors stay on the first stage if they were there, else go to the
    /// last. Default: every tensor keeps its source stage.
    #[arg(long, value_name = "N", conflicts_with_all = ["strategy", "unshard"])]
    pp: Option<u64>,
    /// A target job's metadata.json, or a JSON object {tensor name: layout};
    /// each tensor takes the layout given there.
    #[arg(long, value_name = "FILE", conflicts_with = "unshard")]
    strategy: Option<PathBuf>,
    /// One rank holding every tensor whole.
    #[arg(long)]
    unshard: bool,
}

impl TargetArgs {
    /// The target, or the source's own strategy when none is given.
    fn spec_or_identity(&self) -> Result<TargetSpec> {
        if self.mesh.is_empty() && self.pp.is_none() && self.strategy.is_none() && !self.unshard {
            return Ok(TargetSpec::Mesh {
                sizes: Vec::new(),
                pp: None,
            });
        }
        self.spec()
    }

    fn spec(&self) -> Result<TargetSpec> {
        if let Some(path) = &self.strategy {
            return Ok(TargetSpec::Strategy(path.clone()));
        }
        if self.unshard {
            return Ok(TargetSpec::Unshard);
        }
        if self.mesh.is_empty() && self.pp.is_none() {
            bail!("no target given: pass --mesh ALIAS=N, --pp N, --strategy FILE or --unshard");
        }
        Ok(TargetSpec::Mesh {
            sizes: TargetSpec::parse_mesh(&self.mesh)?,
            pp: self.pp,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"));
    if let Some(level) = &cli.log_level {
        // fuser logs every request at debug; the daemon logs what matters.
        logger.parse_filters(&format!("{level},fuser=error"));
    }
    logger.init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Inspect { src, json } => {
            let source = Source::open(&src)?;
            let r = report::inspect(&source);
            print_report(json, &r, || r.text())
        }
        Command::Plan { src, target, json } => {
            let plan = load_plan(&src, target.spec()?)?;
            let r = report::plan(&plan);
            print_report(json, &r, || r.text())
        }
        Command::Export {
            src,
            dest,
            target,
            force,
            threads,
            no_progress,
        } => {
            let plan = load_plan(&src, target.spec()?)?;
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
            let start = std::time::Instant::now();
            let stats = export(
                &plan,
                &dest,
                &ExportOptions {
                    force,
                    threads,
                    progress: !no_progress,
                },
            )?;
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "exported {} file(s), {} in {:.2} s ({}/s) to {}",
                stats.files,
                report::human(stats.bytes),
                secs,
                report::human((stats.bytes as f64 / secs.max(1e-9)) as u64),
                dest.display()
            );
            Ok(())
        }
        Command::Mount {
            src,
            mnt,
            target,
            foreground,
            cache_size,
            prefetch_window,
            no_prefetch,
            threads,
            allow_other,
            log_file,
            serve_zeros,
        } => {
            // Everything that can be wrong with the input is found here,
            // before anything is mounted.
            daemon::check_mount_point(&mnt)?;
            let plan = load_plan(&src, target.spec_or_identity()?)?;
            let prefetch = if no_prefetch {
                PrefetchConfig::off()
            } else {
                PrefetchConfig {
                    window: prefetch_window,
                    ..PrefetchConfig::default()
                }
            };
            let mut server = Server::with_prefetch(plan, cache_size, prefetch);
            if serve_zeros {
                server = server.serve_zeros();
            }
            daemon::mount(
                server,
                &mnt,
                &daemon::MountOptions {
                    foreground,
                    threads: threads.unwrap_or_else(|| cpus().max(2)),
                    allow_other,
                    log_file,
                },
            )
        }
    }
}

/// Reads and checks the source, then plans the view, logging how long each took.
fn load_plan(src: &std::path::Path, spec: TargetSpec) -> Result<Plan> {
    let t0 = std::time::Instant::now();
    let source = Source::open(src)?;
    let t1 = std::time::Instant::now();
    let plan = Plan::build(source, spec)?;
    log::info!(
        "read and checked the source in {:.1} ms, planned in {:.1} ms",
        (t1 - t0).as_secs_f64() * 1e3,
        t1.elapsed().as_secs_f64() * 1e3
    );
    Ok(plan)
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn print_report<T: serde::Serialize>(
    json: bool,
    r: &T,
    text: impl FnOnce() -> String,
) -> Result<()> {
    use std::io::Write;
    let out = if json {
        let mut s = serde_json::to_string_pretty(r)
            .map_err(|e| reshardfs::bad!("internal: cannot render JSON: {e}"))?;
        s.push('\n');
        s
    } else {
        text()
    };
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = stdout.write_all(out.as_bytes());
    Ok(())
}
