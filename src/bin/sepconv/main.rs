//! The `sepconv` command line: one file per subcommand.

mod analyze;
mod bench;
mod compare;
mod conv;
mod cost;
mod decompose;
mod eval;
mod plot;
mod progress;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Separable convolutions for CNNs: compute them, count what they cost, benchmark them.
#[derive(Parser)]
#[command(name = "sepconv", version, about, long_about = None)]
struct Cli {
    /// Worker threads (default: all cores). A convolution under 128 K multiply-accumulates
    /// runs on one of them: less work than waking a second thread costs.
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    /// Instruction set of the kernels: avx512, avx2 or portable (default: the best this CPU
    /// supports). To compare the same work across instruction sets on one machine.
    #[arg(long, global = true, value_name = "ISA", value_parser = parse_isa)]
    isa: Option<sepconv::Isa>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Each variant's help is its Args struct's doc comment (summary line, then details).
enum Command {
    Compare(compare::Args),
    Train(train::Args),
    Eval(eval::Args),
    Cost(cost::Args),
    Analyze(analyze::Args),
    Decompose(decompose::Args),
    Conv(conv::Args),
    Bench(bench::Args),
}

fn main() -> ExitCode {
    // Output piped into a command that stops reading (`sepconv bench | head`) ends the process
    // quietly, as Unix tools do; Rust ignores SIGPIPE, and println! then panics. Files are
    // written atomically (`io::write_atomic`), so none is left half-written.
    // SAFETY: restores the default disposition of one signal before any thread starts.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let threads = match cli.threads {
        Some(0) => return fail(&sepconv::Error::invalid("--threads must be at least 1")),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let pool = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(p) => p,
        Err(e) => {
            return fail(&sepconv::Error::Runtime(format!(
                "cannot start {threads} threads: {e}"
            )));
        }
    };
    let exec = match cli.isa {
        None => sepconv::Exec::new(threads),
        Some(isa) if isa.is_supported() => match sepconv::Exec::new(threads).with_isa(isa) {
            Ok(exec) => exec,
            Err(e) => return fail(&e),
        },
        Some(isa) => {
            let have: Vec<String> = sepconv::Isa::available()
                .iter()
                .map(|i| i.to_string())
                .collect();
            return fail(&sepconv::Error::invalid(format!(
                "--isa {isa}: this CPU does not support it (it runs {})",
                have.join(", ")
            )));
        }
    };
    let result = pool.install(|| match cli.command {
        Command::Compare(a) => compare::run(exec, a),
        Command::Train(a) => train::run(exec, a),
        Command::Eval(a) => eval::run(exec, a),
        Command::Conv(a) => conv::run(exec, a),
        Command::Cost(a) => cost::run(exec, a),
        Command::Analyze(a) => analyze::run(exec, a),
        Command::Decompose(a) => decompose::run(exec, a),
        Command::Bench(a) => bench::run(exec, a),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// `--isa`'s value.
fn parse_isa(s: &str) -> Result<sepconv::Isa, String> {
    match s {
        "avx512" => Ok(sepconv::Isa::Avx512),
        "avx2" => Ok(sepconv::Isa::Avx2),
        "portable" => Ok(sepconv::Isa::Portable),
        _ => Err(format!(
            "unknown instruction set '{s}' (expected avx512, avx2 or portable)"
        )),
    }
}

/// Help and version go to stdout as clap renders them; usage errors become one line on stderr
/// with exit code 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
    }
    let text = e.render().to_string();
    let line: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .collect();
    eprintln!("sepconv: {}", line.join(" "));
    ExitCode::from(2)
}

/// Prints one line to stderr; exit code 2 for bad input or usage, 1 for a failure while running.
fn fail(e: &sepconv::Error) -> ExitCode {
    eprintln!("sepconv: error: {e}");
    ExitCode::from(if e.is_user_error() { 2 } else { 1 })
}
