//! `smtp-lb`: parses arguments, sets up tracing, and hands over to the library.
use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use smtp_lb_user::cli::{Cli, Command, LogFormat, check, ctl, decap, lb, relay};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the cause chain joined, so the cause and the fix are both visible.
            eprintln!("smtp-lb: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("SMTP_LB_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match format {
        // No colour codes in journald or a file.
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).init(),
        // Fields at the top level, next to `timestamp`, `level` and `message`.
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Lb(opts) => runtime()?.block_on(lb::run(opts, shutdown_signal())),
        Command::Decap(opts) => runtime()?.block_on(decap::run(opts, shutdown_signal())),
        Command::Ctl(opts) => ctl::run(opts),
        Command::Relay(opts) => runtime()?.block_on(relay::run(opts, shutdown_signal())),
        Command::CheckConfig(opts) => check::run(&opts),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
