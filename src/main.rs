//! The `reshardfs` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use reshardfs::checkpoint::models::{self, ModelChoice};
use reshardfs::checkpoint::s3::store as s3store;
use reshardfs::checkpoint::source::Source;
use reshardfs::export::{ExportOptions, export};
use reshardfs::mount::daemon;
use reshardfs::mount::prefetch::{self, PrefetchConfig};
use reshardfs::mount::serve::Server;
use reshardfs::report;
use reshardfs::reshard::cast;
use reshardfs::reshard::plan::{HfOptions, Plan, ViewOptions};
use reshardfs::reshard::target::TargetSpec;
use reshardfs::{Result, bail};
use safetensors::Dtype;

/// Distributed checkpoints, resharded on the fly.
///
/// reshardfs shows a MindSpore Transformers Checkpoint 2.0 checkpoint as it
/// would look had it been saved with another parallel strategy: the same
/// tensors, sliced for the target's ranks, in ordinary safetensors files with
/// a matching metadata.json. It also bridges Hugging Face and MindSpore
/// Transformers: a Hub Qwen3 folder shows as a MindSpore Transformers
/// checkpoint of any strategy, and `--hf` shows a MindSpore Transformers
/// checkpoint as a Hugging Face folder transformers and vLLM load (Qwen3 and
/// Qwen3-MoE, with expert parallelism).
///
/// Exit codes: 0 success, 2 bad input (checkpoint or target), 1 other failure.
#[derive(Parser)]
#[command(name = "reshardfs", version, about, long_about)]
struct Cli {
    /// Log level: error, warn, info, debug or trace (default: RUST_LOG, else warn).
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    #[command(flatten)]
    s3: S3Args,
    #[command(subcommand)]
    command: Command,
}

/// How a source in an S3-compatible object store (`s3://BUCKET/PREFIX`) is
/// reached. Credentials come from the environment as for the AWS tools:
/// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN, else
/// AWS_PROFILE (default `default`) in ~/.aws/credentials and ~/.aws/config;
/// the region from AWS_REGION (default us-east-1); extra root certificates
/// for https from AWS_CA_BUNDLE.
#[derive(Args)]
struct S3Args {
    /// The store's URL, for S3-compatible stores (MinIO, Ceph RGW, OBS, ...):
    /// addressed path-style. Default: AWS_ENDPOINT_URL, else AWS S3.
    #[arg(long, global = true, value_name = "URL")]
    endpoint_url: Option<String>,
    /// Send requests unsigned (a public bucket): no credentials needed.
    #[arg(long, global = true)]
    no_sign_request: bool,
    /// Tries of one request in all, the first included, on 5xx, SlowDown,
    /// resets and timeouts [default: 5].
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    s3_max_attempts: Option<u32>,
    /// No retry starts once this many seconds have passed since a
    /// request's first try: a store that stays unreachable fails the reads
    /// that need it (EIO) within about this bound [default: 30].
    #[arg(long, global = true, value_name = "SECONDS", value_parser = parse_seconds)]
    s3_retry_timeout: Option<std::time::Duration>,
    /// One request (connect, send, the whole answer) takes at most this
    /// many seconds [default: 20].
    #[arg(long, global = true, value_name = "SECONDS", value_parser = parse_seconds)]
    s3_timeout: Option<std::time::Duration>,
    /// Bound of the cache of object blocks (8 MiB each), beside
    /// --cache-size's cache of view blocks [default: 512M].
    #[arg(long, global = true, value_name = "SIZE", value_parser = parse_size)]
    s3_cache_size: Option<u64>,
    /// Keep object blocks and headers in DIR too (made 0700 if missing), so
    /// that the next start on this machine fetches only what changed. Off
    /// by default. Each block is named by its object's key and ETag: a
    /// replaced object is never served from it.
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Bound of --cache-dir; the least recently used blocks go first
    /// [default: 10G].
    #[arg(long, global = true, value_name = "SIZE", value_parser = parse_size, requires = "cache_dir")]
    cache_dir_size: Option<u64>,
}

impl S3Args {
    fn options(&self) -> s3store::Options {
        let mut o = s3store::Options {
            endpoint: self.endpoint_url.clone(),
            no_sign: self.no_sign_request,
            ..Default::default()
        };
        if let Some(n) = self.s3_max_attempts {
            o.retry.attempts = n;
        }
        if let Some(t) = self.s3_retry_timeout {
            o.retry.total = t;
        }
        if let Some(t) = self.s3_timeout {
            o.retry.timeout = t;
        }
        if let Some(c) = self.s3_cache_size {
            o.cache_bytes = c;
        }
        // Absolute: the mount's daemon leaves the working directory.
        o.cache_dir = self.cache_dir.as_ref().map(|d| {
            let d = std::path::absolute(d).unwrap_or_else(|_| d.clone());
            (d, self.cache_dir_size.unwrap_or(10 << 30))
        });
        o
    }
}

/// Seconds, fractions allowed, more than 0 and at most a day.
fn parse_seconds(s: &str) -> std::result::Result<std::time::Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v > 0.0 && v <= 86_400.0) {
        return Err(format!(
            "{s:?}: expected more than 0 and at most 86400 seconds"
        ));
    }
    Ok(std::time::Duration::from_secs_f64(v))
}

#[derive(Subcommand)]
enum Command {
    /// Show a checkpoint: iterations, world size, stages, and per tensor its
    /// dtype, shape, layout, slices and files.
    Inspect {
        /// Checkpoint root (with latest_checkpointed_iteration.txt), one
        /// iteration folder, a Hugging Face model folder, or a folder of
        /// plain safetensors files; on disk or in an object store
        /// (`s3://BUCKET/PREFIX`).
        src: PathBuf,
        /// Read the source through a model's map (`qwen3`, `qwen3_moe`) or as
        /// stored (`none`).
        #[arg(long, value_name = "MODEL", value_parser = ModelChoice::parse)]
        model: Option<ModelChoice>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the view a target gives: every file with its size and tensors,
    /// where each tensor's bytes come from, and totals.
    Plan {
        /// Checkpoint root, iteration folder, Hugging Face model folder, or plain safetensors folder,
        /// on disk or `s3://BUCKET/PREFIX`.
        src: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        view: ViewArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the view to DEST, with the same tree a mount shows.
    Export {
        /// Checkpoint root, iteration folder, Hugging Face model folder, or plain safetensors folder,
        /// on disk or `s3://BUCKET/PREFIX`.
        src: PathBuf,
        /// Destination folder (created if missing; must be empty unless --force).
        dest: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        view: ViewArgs,
        /// Write into a non-empty DEST, replacing files of the same names and
        /// removing rank files of an earlier view that this view does not have.
        #[arg(long)]
        force: bool,
        /// Files written in parallel, at least 1 (default: the number of CPUs).
        #[arg(long, value_name = "N", value_parser = parse_threads)]
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
        /// Checkpoint root, iteration folder, Hugging Face model folder, or plain safetensors folder,
        /// on disk or `s3://BUCKET/PREFIX`.
        src: PathBuf,
        /// An existing directory (what it holds is hidden while mounted).
        mnt: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        view: ViewArgs,
        /// Stay attached and log to stderr; SIGINT/SIGTERM/SIGHUP unmount.
        #[arg(long)]
        foreground: bool,
        /// Block cache budget, e.g. 512M or 2G, at least 16K. Never exceeded:
        /// blocks are at most a quarter of it (between 4 KiB and 1 MiB).
        #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_cache_size)]
        cache_size: u64,
        /// How far ahead of a sequential reader view bytes are computed,
        /// when their source is not yet in the page cache (and, on a FUSE or
        /// network source such as sshfs or NFS, asked of it a readahead
        /// window at a time; from an object store, fetched), at most half the
        /// cache [default: 16M; 64M from an object store, where it keeps 8
        /// GETs of 8 MiB in flight].
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        prefetch_window: Option<u64>,
        /// Compute and ask for nothing ahead of readers.
        #[arg(long)]
        no_prefetch: bool,
        /// Serve every view file through the daemon. By default a view file
        /// that is a source file whole (`plan` marks it) is read by the
        /// kernel straight from that file (FUSE passthrough: Linux 6.9+,
        /// and CAP_SYS_ADMIN, so not for an ordinary user, who gets the
        /// daemon anyway).
        #[arg(long)]
        no_passthrough: bool,
        /// FUSE request threads, at least 1 (default: the number of CPUs, and
        /// at least 2).
        #[arg(long, value_name = "N", value_parser = parse_threads)]
        threads: Option<usize>,
        /// Let other users read the mount (default: only the mounting user).
        #[arg(long)]
        allow_other: bool,
        /// Append the background daemon's log to FILE.
        #[arg(long, value_name = "FILE")]
        log_file: Option<PathBuf>,
        /// Benchmarks only: view files read as zeros past their headers (FUSE
        /// cost alone).
        #[arg(long, hide = true)]
        serve_zeros: bool,
    },
}

/// Parses `1048576`, `64K`, `512M`, `2G`, `1GiB`, `1.5G` into bytes; K, M,
/// G, T (with or without B) are binary here, as for memory.
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    parse_bytes(s, false)
}

/// A cache budget: four of the smallest blocks (4 KiB) at least, so that a
/// block is never more than a quarter of it, as `--help` promises.
fn parse_cache_size(s: &str) -> std::result::Result<u64, String> {
    const MIN: u64 = 4 * 4096;
    match parse_size(s)? {
        n if n < MIN => Err(format!(
            "{s:?} is {n} bytes; the cache needs at least 16K (four blocks of 4 KiB, the smallest)"
        )),
        n => Ok(n),
    }
}

/// A thread count: at least one.
fn parse_threads(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("at least 1 thread is needed".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a number of threads")),
    }
}

/// Parses a shard size as transformers does: `5GB` is 5*10^9 bytes, `5GiB`
/// is 5*2^30.
fn parse_shard_size(s: &str) -> std::result::Result<u64, String> {
    match parse_bytes(s, true)? {
        0 => Err(format!("{s:?}: a shard size must be positive")),
        n => Ok(n),
    }
}

/// A byte count with an optional fraction and unit, computed in integers so
/// `1.5G` is exactly 1610612736. `decimal`: K, M, G, T (and KB...) are
/// powers of 1000; KiB, MiB, GiB, TiB are always powers of 1024.
fn parse_bytes(s: &str, decimal: bool) -> std::result::Result<u64, String> {
    let bad = || format!("{s:?} is not a size like 512M, 2G or 5GB");
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || frac.len() > 18 {
        return Err(bad());
    }
    let unit = unit.trim().to_ascii_lowercase();
    let step: u128 = if unit.ends_with("ib") || !decimal {
        1024
    } else {
        1000
    };
    let power = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 1,
        "m" => 2,
        "g" => 3,
        "t" => 4,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use K, M, G or T")),
    };
    let mult = step.pow(power);
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| bad())?
    };
    let scale = 10u128.pow(frac.len() as u32);
    let total = int
        .checked_mul(mult)
        .and_then(|v| v.checked_add(frac_value * mult / scale))
        .filter(|&v| v <= u128::from(u64::MAX))
        .ok_or_else(|| format!("{s:?} is too large"))?;
    Ok(total as u64)
}

/// How the view's files look: a model map, a Hugging Face folder, a cast.
#[derive(Args)]
struct ViewArgs {
    /// Read the source through a model's map: `qwen3`, `qwen3_moe`, or
    /// `none` for the tensors as stored. Default: a folder whose
    /// config.json names one of those `model_type`s is a Hugging Face
    /// model, read as the MindSpore Transformers checkpoint it converts to.
    #[arg(long, value_name = "MODEL", value_parser = ModelChoice::parse)]
    model: Option<ModelChoice>,
    /// Show each iteration as a Hugging Face folder: HF names, fused
    /// tensors split back, model-0000i-of-0000N.safetensors shards and
    /// model.safetensors.index.json, no optimizer states.
    #[arg(long, conflicts_with_all = ["mesh", "pp", "strategy", "unshard", "prefix"])]
    hf: bool,
    /// With --hf: show every file of DIR except its weights (config.json,
    /// tokenizer files, ...) beside the view's weights, byte for byte but
    /// for config.json's dtype, which states the view's. DIR may be a Hub
    /// cache folder (models--ORG--NAME). Default for a Hugging Face source:
    /// its own folder; else config.json is generated from the tensors (the
    /// model from --model, or recognised from the tensor names), and stderr
    /// says which fields were assumed.
    #[arg(long, value_name = "DIR")]
    hf_files: Option<PathBuf>,
    /// With --hf: the largest shard, as transformers counts (5GB = 5*10^9
    /// bytes, 5GiB = 5*2^30) [default: 5GB].
    #[arg(long, value_name = "SIZE", value_parser = parse_shard_size)]
    max_shard_size: Option<u64>,
    /// Cast floating-point tensors to bf16, f16 or f32 when read (round to
    /// nearest even, as torch); the view's metadata says the new dtype.
    #[arg(long, value_name = "DTYPE", value_parser = cast::parse_dtype)]
    dtype: Option<Dtype>,
    /// The rank files' prefix (`{prefix}-model-0000000-0000002.safetensors`).
    /// Default: the source's (`qwen3` for a Hugging Face Qwen3).
    #[arg(long, value_name = "PREFIX", value_parser = parse_prefix)]
    prefix: Option<String>,
    /// With --hf and a generated config.json: set field KEY to VALUE (JSON,
    /// e.g. `rope_theta=500000` or `rope_scaling={"rope_type":"yarn","factor":4.0}`;
    /// anything that is not JSON is a string). Repeatable. Fields read off
    /// the tensors and the dtype (--dtype) cannot be set.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_config_field)]
    hf_config: Vec<(String, serde_json::Value)>,
    /// Leave out the source tensors the model map does not know (listed on
    /// stderr) instead of refusing the source. Derived buffers such as
    /// `rotary_emb.inv_freq` are always left out.
    #[arg(long)]
    drop_unknown_tensors: bool,
}

/// `KEY=VALUE` of `--hf-config`: the value as JSON, else as a string.
fn parse_config_field(s: &str) -> std::result::Result<(String, serde_json::Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE (e.g. rope_theta=1000000)"))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(format!("{s:?}: the key is empty"));
    }
    let v = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
    Ok((k.to_string(), v))
}

/// transformers' default `max_shard_size`.
const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;

impl ViewArgs {
    /// Refuses options that would do nothing: each names what it needs.
    /// (clap's `requires` cannot say it: `--hf`, a flag, is always present
    /// to clap, with its default `false`.)
    fn check(&self) -> Result<()> {
        if self.hf {
            return Ok(());
        }
        let only_hf = [
            ("--hf-files", self.hf_files.is_some()),
            ("--max-shard-size", self.max_shard_size.is_some()),
            ("--hf-config", !self.hf_config.is_empty()),
        ];
        if let Some((flag, _)) = only_hf.iter().find(|(_, given)| *given) {
            bail!(
                "{flag} does something only with --hf (a Hugging Face view): add --hf, or drop {flag}"
            );
        }
        Ok(())
    }
}

fn parse_prefix(s: &str) -> std::result::Result<String, String> {
    if s.is_empty() || s.contains(['/', '\0']) || s == "." || s == ".." {
        return Err(format!("{s:?} is not a file-name prefix"));
    }
    Ok(s.to_string())
}

/// The target strategy. Give --mesh and/or --pp, or --strategy, or --unshard.
#[derive(Args)]
struct TargetArgs {
    /// New sizes for named device axes, e.g. `tp=2`, `dp=1,tp=4` or
    /// `dp=8,tp=1,ep=8`. Every tensor keeps its alias names and tensor map;
    /// axes not named keep their size, except a MoE expert matrix's
    /// `dp_ex_ep`, which follows dp*tp*cp/ep. Repeatable.
    #[arg(long, value_name = "ALIAS=N[,ALIAS=N...]", conflicts_with_all = ["strategy", "unshard"])]
    mesh: Vec<String>,
    /// Number of pipeline stages: layer i of L goes to stage i*N/L. From a
    /// single-stage source the final norm and the output layer (and their
    /// optimizer states) go to the last stage and every other tensor outside
    /// the layers to the first; from a multi-stage source such a tensor stays
    /// first if it was first, else goes last. Default: every tensor keeps its
    /// source stage.
    #[arg(long, value_name = "N", conflicts_with_all = ["strategy", "unshard"])]
    pp: Option<u64>,
    /// With --pp: MindSpore Transformers' `offset`, one integer per stage
    /// added to its layers/N (e.g. `--pp 3 --pp-offset 1,0,0` puts 10, 9
    /// and 9 of 28 layers on the three stages). They must sum to the
    /// remainder layers % N; a --pp that does not divide the layers needs
    /// it. The first and last stage may hold no layer, the others at least one.
    #[arg(
        long,
        value_name = "O,O,...",
        requires = "pp",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    pp_offset: Option<Vec<i64>>,
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
                offset: None,
            });
        }
        self.spec()
    }

    /// The target `plan` and `export` need: one must be given, except for
    /// a Hugging Face view, whose files hold every tensor whole anyway.
    fn spec_for(&self, view: &ViewArgs) -> Result<TargetSpec> {
        if view.hf {
            self.spec_or_identity()
        } else {
            self.spec()
        }
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
            offset: self.pp_offset.clone(),
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
    tune_process();
    s3store::configure(cli.s3.options());
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// Settings of the whole process, made once at start-up, before any thread
/// starts (library code never changes them).
///
/// * One glibc malloc arena. Cache blocks are allocated by one request
///   thread and often freed (evicted) by another; with per-thread arenas the
///   freed space stays pinned in the arena it came from, and the daemon's
///   RSS ran 40-110 MiB over the cache budget (213 MiB peak for a 200 MiB
///   cache with one arena, 328 MiB without). Arenas also outlive their
///   threads: the pre-open's threads left theirs to the request threads
///   (bench row 7: 278-322 MiB peak against 246-256 MiB for a 205 MiB cache).
/// * The soft limit on open files raised to the hard one: a rank file's
///   descriptor stays open while it is mapped (to ask `cachestat` which of
///   its pages are cached), and a checkpoint of 512 ranks has 1024 model and
///   optimizer files, the usual soft limit. Nothing here uses `select`, the
///   reason that limit is low. Failing leaves the limit as it was.
fn tune_process() {
    // SAFETY: mallopt only tunes the allocator; no other thread runs yet.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        log::debug!("cannot raise the open file limit from {soft} to {hard}: {e}");
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Inspect { src, model, json } => {
            let source = Source::open_with(&src, model.unwrap_or_default())?;
            let r = report::inspect(&source);
            print_report(json, &r, || r.text())
        }
        Command::Plan {
            src,
            target,
            view,
            json,
        } => {
            let plan = load_plan(&src, target.spec_for(&view)?, &view)?;
            let r = report::plan(&plan);
            print_report(json, &r, || r.text())
        }
        Command::Export {
            src,
            dest,
            target,
            view,
            force,
            threads,
            no_progress,
        } => {
            let plan = load_plan(&src, target.spec_for(&view)?, &view)?;
            storage_hint(&src);
            let threads = threads.unwrap_or_else(cpus);
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
            let whole = match stats.copied_whole {
                0 => String::new(),
                n => format!(", {n} copied whole from the source"),
            };
            eprintln!(
                "exported {} file(s){whole}, {} in {:.2} s ({}/s) to {}",
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
            view,
            foreground,
            cache_size,
            prefetch_window,
            no_prefetch,
            no_passthrough,
            threads,
            allow_other,
            log_file,
            serve_zeros,
        } => {
            // Everything that can be wrong with the input is found here,
            // before anything is mounted.
            daemon::check_mount_point(&mnt)?;
            let plan = load_plan(&src, target.spec_or_identity()?, &view)?;
            storage_hint(&src);
            let prefetch = if no_prefetch {
                PrefetchConfig::off()
            } else {
                // Objects are fetched in 8 MiB blocks by 8 fetchers: a window
                // of 8 blocks keeps them busy (16 MiB kept 2 in flight).
                let default = if plan.source.is_remote() {
                    64 << 20
                } else {
                    16 << 20
                };
                PrefetchConfig {
                    window: prefetch_window.unwrap_or(default),
                    // For measuring and testing only (docs/DESIGN.md lists it).
                    mode: std::env::var(prefetch::Mode::ENV)
                        .map_or(prefetch::Mode::Auto, |v| prefetch::Mode::parse(&v)),
                    ..PrefetchConfig::default()
                }
            };
            let mut server = Server::with_prefetch(plan, cache_size, prefetch);
            if serve_zeros {
                server = server.serve_zeros();
            }
            if no_passthrough {
                server = server.without_passthrough();
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

/// Says so when the source's filesystem will make cold reads slow and a
/// setting would fix it (a FUSE or network mount with little readahead).
fn storage_hint(src: &std::path::Path) {
    if let Some(h) = reshardfs::checkpoint::storage::readahead_hint(src) {
        eprintln!("note: {h}");
    }
}

/// Reads and checks the source, then plans the view, logging how long each took.
fn load_plan(src: &std::path::Path, spec: TargetSpec, view: &ViewArgs) -> Result<Plan> {
    view.check()?;
    let t0 = std::time::Instant::now();
    let model = view.model.unwrap_or_default();
    let mut source = Source::open_with(src, model)?;
    let mut hf = None;
    if view.hf {
        let v = models::hf_view(source, model, view.hf_files.as_deref())?;
        source = v.source;
        hf = Some(HfOptions {
            max_shard_size: view.max_shard_size.unwrap_or(DEFAULT_SHARD_SIZE),
            files: v.files,
            config_overrides: view.hf_config.clone(),
            files_dir: v.dir,
        });
    }
    let options = ViewOptions {
        dtype: view.dtype,
        prefix: view.prefix.clone(),
        hf,
        drop_unknown: view.drop_unknown_tensors,
    };
    let t1 = std::time::Instant::now();
    let plan = Plan::build_with(source, spec, options)?;
    log::info!(
        "read and checked the source in {:.1} ms, planned in {:.1} ms",
        (t1 - t0).as_secs_f64() * 1e3,
        t1.elapsed().as_secs_f64() * 1e3
    );
    // What the view assumed or left out is said before anything is written
    // or mounted, once even when every iteration says it.
    let mut said = std::collections::HashSet::new();
    for w in plan.iterations.iter().flat_map(|ip| &ip.warnings) {
        if said.insert(w) {
            eprintln!("note: {w}");
        }
    }
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
            .map_err(|e| reshardfs::internal!("cannot render JSON: {e}"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_binary_and_shard_sizes_decimal_as_transformers_counts() {
        let k = 1024u64;
        for (s, want) in [
            ("1048576", 1 << 20),
            ("64K", 64 * k),
            ("64k", 64 * k),
            ("512M", 512 * k * k),
            ("2G", 2 << 30),
            ("1GiB", 1 << 30),
            ("1.5G", 1_610_612_736),
            (" 3 M ", 3 << 20),
            ("1T", 1 << 40),
            ("0", 0),
            (".5K", 512),
        ] {
            assert_eq!(parse_size(s), Ok(want), "{s:?}");
        }
        for (s, want) in [
            ("5GB", 5_000_000_000u64),
            ("5GiB", 5 << 30),
            ("100MB", 100_000_000),
            ("2.5KB", 2500),
            ("7", 7),
        ] {
            assert_eq!(parse_shard_size(s), Ok(want), "{s:?}");
        }
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        for s in ["", "M", "1.2.3G", "12X", "-1", "1e9"] {
            let e = parse_size(s).unwrap_err();
            assert!(e.contains(&format!("{s:?}")), "{s:?}: {e}");
        }
        assert!(parse_size("16E").unwrap_err().contains("unknown unit"));
        // 2^64 bytes and more: refused, not wrapped.
        assert!(parse_size("16777216T").unwrap_err().contains("too large"));
        assert!(parse_size("18446744073709551616").is_err());
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert!(parse_size("1.0000000000000000001K").is_err(), "19 decimals");
        assert!(parse_shard_size("0").unwrap_err().contains("positive"));
    }
}
