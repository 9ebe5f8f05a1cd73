//! The `smc-steer` command line: run SMC on a language model, batch jobs, inspect models.
//!
//! See `docs/cli.md` for the reference and the JSON schemas. This file parses the command
//! line and dispatches; each subcommand has its own file, and everything statistical is the
//! library's.

mod args;
mod batch;
mod execute;
mod failure;
mod files;
mod inspect;
mod jobs;
mod kernel;
mod model_path;
mod output;
mod run;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use args::{BatchArgs, InspectArgs, RunArgs};
use failure::exit;

#[derive(Parser, Debug)]
#[command(
    name = "smc-steer",
    version,
    about = "Steer language models with Sequential Monte Carlo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run SMC on one prompt and print the posterior over completions.
    Run(RunArgs),
    /// Run one job per line of a JSONL file; one JSON result per line on stdout, in order.
    Batch(BatchArgs),
    /// Show a model's architecture, sizes, vocabulary, special tokens and chat template.
    Inspect(InspectArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // Help and version go to stdout with success; errors are one clear line.
            if !e.use_stderr() {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.render().to_string();
            let first = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("error: invalid arguments");
            eprintln!("{first} (see --help)");
            return ExitCode::from(exit::USAGE);
        }
    };
    let result = match cli.command {
        Command::Run(a) => run::run(a),
        Command::Batch(a) => batch::batch(a),
        Command::Inspect(a) => inspect::inspect(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            // One line: multi-line messages (a regex parser's caret, say) are joined.
            // A backtrace (RUST_BACKTRACE set) never reaches the user's message.
            let message: Vec<&str> = f
                .message
                .lines()
                .take_while(|l| !l.trim_start().starts_with("stack backtrace:"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("error: {}", message.join(" "));
            ExitCode::from(f.code)
        }
    }
}
