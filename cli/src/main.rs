//! The `switchyard` command; see `switchyard --help`.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error,librdkafka=off,rdkafka=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = switchyard_cli::Cli::parse();
    let stdin = std::io::stdin().lock();
    // Buffered: `run` flushes before it acks what it printed, and at the end.
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    match switchyard_cli::run(cli, stdin, &mut stdout).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e}");
            ExitCode::FAILURE
        }
    }
}
