//! Writes ferryd(8) in roff to stdout, generated from the command-line definition so the man page
//! cannot drift from `--help`. Used by packaging/build-deb.

use clap::CommandFactory;

fn main() -> std::io::Result<()> {
    let man = clap_mangen::Man::new(ferryd::cli::Cli::command()).section("8");
    man.render(&mut std::io::stdout())
}
