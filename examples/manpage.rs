//! Writes the man pages in roff to stdout, each generated from the one source it documents, so
//! neither can drift: `manpage` (or `manpage ferryd`) gives ferryd(8) from the command-line
//! definition; `manpage toml` gives ferryd.toml(5) from docs/configuration.md's reference.
//! Used by packaging/build-deb.

use clap::CommandFactory;

/// docs/configuration.md, whose "Configuration reference" section is the one text of the file's
/// reference.
const DOC: &str = include_str!("../docs/configuration.md");
const SECTION: &str = "## Configuration reference";

fn main() -> std::io::Result<()> {
    match std::env::args().nth(1).as_deref() {
        None | Some("ferryd") => {
            let man = clap_mangen::Man::new(ferryd::cli::Cli::command()).section("8");
            man.render(&mut std::io::stdout())
        }
        Some("toml") => {
            print!("{}", config_page(DOC));
            Ok(())
        }
        Some(other) => Err(std::io::Error::other(format!(
            "unknown page {other:?}: ferryd or toml"
        ))),
    }
}

/// ferryd.toml(5) from the document's configuration reference.
fn config_page(doc: &str) -> String {
    let start = doc.find(SECTION).map_or(0, |i| i + SECTION.len());
    let rest = &doc[start..];
    let body = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut out = String::new();
    out.push_str(&format!(
        ".TH FERRYD.TOML 5 \"\" \"ferryd {}\" \"File formats\"\n",
        env!("CARGO_PKG_VERSION")
    ));
    out.push_str(".SH NAME\nferryd.toml \\- configuration file of ferryd(8)\n");
    out.push_str(".SH SYNOPSIS\n/etc/ferryd/ferryd.toml\n");
    out.push_str(".SH DESCRIPTION\n");
    let mut paragraph = false;
    for line in body.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            paragraph = false;
            continue;
        }
        if let Some(heading) = line.strip_prefix("### ") {
            out.push_str(&format!(".SH {}\n", inline(heading).to_uppercase()));
            paragraph = true;
            continue;
        }
        if let Some(item) = line.strip_prefix("- ") {
            out.push_str(&format!(".IP \\(bu 2\n{}\n", inline(item)));
            paragraph = true;
            continue;
        }
        if !paragraph {
            out.push_str(".PP\n");
            paragraph = true;
        }
        out.push_str(&inline(line.trim_start()));
        out.push('\n');
    }
    out.push_str(".SH SEE ALSO\nferryd(8)\n");
    out
}

/// Markdown emphasis and code to roff fonts, links to their text, and roff's special characters
/// escaped.
fn inline(text: &str) -> String {
    let mut out = String::new();
    let text = text.replace("**", "\u{1}");
    let mut bold = false;
    let mut code = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1}' => {
                out.push_str(if bold { "\\fR" } else { "\\fB" });
                bold = !bold;
            }
            '`' => {
                if !bold {
                    out.push_str(if code { "\\fR" } else { "\\fI" });
                }
                code = !code;
            }
            '[' => {
                // [text](target) → text
                let mut label = String::new();
                for c in chars.by_ref() {
                    if c == ']' {
                        break;
                    }
                    label.push(c);
                }
                if chars.peek() == Some(&'(') {
                    for c in chars.by_ref() {
                        if c == ')' {
                            break;
                        }
                    }
                }
                out.push_str(&inline(&label));
            }
            '\\' => out.push_str("\\e"),
            '-' => out.push_str("\\-"),
            '.' | '\'' if out.is_empty() || out.ends_with('\n') => {
                out.push_str("\\&");
                out.push(c);
            }
            '—' => out.push_str("\\(em"),
            c => out.push(c),
        }
    }
    if bold || code {
        out.push_str("\\fR");
    }
    out
}
