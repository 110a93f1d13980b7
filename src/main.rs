//! The `pgleader` binary: argv → config → tracing → runtime → `app::run_with_signals`.
//! Exit codes: 0 after a clean drain, 1 on a runtime failure, 2 on a configuration error
//! (`status` has its own, see `cli`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgleader::config::LogFormat;
use pgleader::Config;

/// A leader-aware PostgreSQL TCP proxy: clients are spliced only to the current primary.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The TOML configuration file.
    #[arg(long, short, env = "PGLEADER_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log format on stderr (overrides `[log] format`).
    #[arg(long, value_enum, global = true)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration, print it with defaults filled in (secrets masked), and exit:
    /// 0 if valid, 2 if not.
    CheckConfig,
    /// Ask a running pgleader (its admin listener) for its status and print one row per backend:
    /// exit 0 with a leader, 1 without, 2 when pgleader cannot be reached.
    Status(pgleader::cli::StatusArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    // `status` talks to a running pgleader; a config file is optional (only its admin address).
    if let Some(Command::Status(status)) = &args.command {
        return pgleader::cli::status(status, args.config.as_deref());
    }
    let Some(path) = args.config.clone() else {
        eprintln!("pgleader: no configuration: pass --config PATH or set PGLEADER_CONFIG");
        return ExitCode::from(2);
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgleader: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::CheckConfig) = args.command {
        #[allow(clippy::print_stdout, reason = "check-config prints the effective config by design")]
        {
            println!("# {}: valid\n{}", path.display(), config.to_toml());
        }
        return ExitCode::SUCCESS;
    }
    init_tracing(args.log_format.unwrap_or(config.log.format), config.log.filter.as_deref());
    // Sessions run on the workers' own threads (`app`); the main runtime keeps only health
    // checks, the elector, the spare filler and the admin server, which one thread serves.
    let mut builder = tokio::runtime::Builder::new_current_thread();
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgleader: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(pgleader::app::run_with_signals(config, path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("pgleader failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `RUST_LOG` wins over `[log] filter`, which wins over `info`.
fn init_tracing(format: LogFormat, filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::try_new(filter.unwrap_or("info")).unwrap_or_else(|_| EnvFilter::new("info")));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
