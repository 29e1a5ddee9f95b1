//! Log lines in journald's native protocol: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, and every
//! field of the event as a journal field of its own (FERRYD_ROUTE=, FERRYD_END=, ...), built on
//! the logging thread and sent by the writer thread.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use super::JOURNAL_FIELD_PREFIX;

/// The layer that turns events into journal entries on the queue.
pub struct JournalLayer {
    identifier: &'static str,
}

impl JournalLayer {
    /// Entries under `identifier` (journalctl -t).
    pub fn new(identifier: &'static str) -> Self {
        JournalLayer { identifier }
    }
}

impl<S: Subscriber> Layer<S> for JournalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        super::queue::submit(|dropped| entry(self.identifier, event, dropped));
    }
}

/// One journal entry for `event`; `dropped` lines lost before it are reported in a field.
fn entry(identifier: &str, event: &Event<'_>, dropped: u64) -> Vec<u8> {
    let meta = event.metadata();
    let priority = match *meta.level() {
        Level::ERROR => "3",
        Level::WARN => "4",
        Level::INFO => "5",
        Level::DEBUG => "6",
        Level::TRACE => "7",
    };
    let mut fields = Fields {
        buf: Vec::with_capacity(256),
        scratch: String::new(),
    };
    fields.put("PRIORITY", priority);
    fields.put("SYSLOG_IDENTIFIER", identifier);
    fields.put("TARGET", meta.target());
    event.record(&mut fields);
    if dropped > 0 {
        fields.put(
            &format!("{JOURNAL_FIELD_PREFIX}_LOG_LINES_DROPPED"),
            &dropped.to_string(),
        );
    }
    fields.buf
}

struct Fields {
    buf: Vec<u8>,
    scratch: String,
}

impl Fields {
    /// Appends `NAME=value`, or the length-prefixed form when the value has a newline.
    fn put(&mut self, name: &str, value: &str) {
        self.buf.extend_from_slice(name.as_bytes());
        if value.contains('\n') {
            self.buf.push(b'\n');
            self.buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
        } else {
            self.buf.push(b'=');
        }
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(b'\n');
    }

    fn put_field(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.put("MESSAGE", value);
        } else if field.name() == "message_id" {
            self.put("MESSAGE_ID", value);
        } else {
            let name = journal_name(field.name());
            self.put(&name, value);
        }
    }
}

/// FERRYD_ and the field's name in upper case, with what journald does not accept left out.
fn journal_name(name: &str) -> String {
    let mut out = String::with_capacity(JOURNAL_FIELD_PREFIX.len() + 1 + name.len());
    out.push_str(JOURNAL_FIELD_PREFIX);
    out.push('_');
    out.extend(
        name.chars()
            .map(|c| if c == '.' { '_' } else { c })
            .filter(|c| *c == '_' || c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_uppercase()),
    );
    out
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put_field(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let mut text = std::mem::take(&mut self.scratch);
        text.clear();
        let _ = write!(text, "{value:?}");
        self.put_field(field, &text);
        self.scratch = text;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_multi_line_values_follow_the_native_protocol() {
        assert_eq!(journal_name("route"), "FERRYD_ROUTE");
        assert_eq!(journal_name("duration_ms"), "FERRYD_DURATION_MS");
        assert_eq!(journal_name("conn"), "FERRYD_CONN");
        let mut fields = Fields {
            buf: Vec::new(),
            scratch: String::new(),
        };
        fields.put("A", "one line");
        fields.put("B", "two\nlines");
        let mut want = b"A=one line\nB\n".to_vec();
        want.extend_from_slice(&9u64.to_le_bytes());
        want.extend_from_slice(b"two\nlines\n");
        assert_eq!(fields.buf, want);
    }
}
