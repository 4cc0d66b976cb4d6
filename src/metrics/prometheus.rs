//! The Prometheus text exposition format (version 0.0.4): families announced once with their help
//! and type, samples with escaped label values, histograms as cumulative buckets with `_sum` and
//! `_count`. What goes into it is the engine's business (`engine::stats`); this only writes it.

use std::fmt::Write;

use super::{Histogram, DURATION_BOUNDS_MICROS};

/// The content type a scrape is answered with.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// An exposition being written.
#[derive(Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// Announces a family; its samples follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {name} {}", kind.as_str());
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<f64>) {
        self.text.push_str(name);
        self.labels(labels, None);
        self.value(value.into());
    }

    /// A histogram's samples for one label set: a bucket per bound (in seconds) and `+Inf`, then
    /// `_sum` and `_count`.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
        let (cumulative, sum) = histogram.snapshot();
        for (i, count) in cumulative.iter().enumerate() {
            let bound = DURATION_BOUNDS_MICROS.get(i).map_or_else(|| "+Inf".to_string(), |micros| format_seconds(*micros));
            let _ = write!(self.text, "{name}_bucket");
            self.labels(labels, Some(&bound));
            self.value(*count as f64);
        }
        let _ = write!(self.text, "{name}_sum");
        self.labels(labels, None);
        self.value(sum);
        let _ = write!(self.text, "{name}_count");
        self.labels(labels, None);
        self.value(cumulative[cumulative.len() - 1] as f64);
    }

    pub fn finish(self) -> String {
        self.text
    }

    fn labels(&mut self, labels: &[(&str, &str)], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.text.push('{');
        let all = labels.iter().copied().chain(le.map(|le| ("le", le)));
        for (i, (key, value)) in all.enumerate() {
            if i > 0 {
                self.text.push(',');
            }
            self.text.push_str(key);
            self.text.push_str("=\"");
            escape_label_into(&mut self.text, value);
            self.text.push('"');
        }
        self.text.push('}');
    }

    fn value(&mut self, value: f64) {
        self.text.push(' ');
        if value.is_finite() && value.fract() == 0.0 && value.abs() < 1e15 {
            let _ = write!(self.text, "{}", value as i64);
        } else {
            let _ = write!(self.text, "{value}");
        }
        self.text.push('\n');
    }
}

/// `0.0001`, `0.25`, `10`: a bound in seconds as Prometheus writes its own.
fn format_seconds(micros: u64) -> String {
    let seconds = micros as f64 / 1e6;
    format!("{seconds}")
}

/// Label values escape backslash, double quote and line feed (the format's only escapes).
fn escape_label_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Help text escapes backslash and line feed.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn families_samples_and_escaped_labels() {
        let mut out = Exposition::default();
        out.family("smartproxy_connections_total", Kind::Counter, "Client connections accepted.");
        out.sample("smartproxy_connections_total", &[], 42u32);
        out.family("smartproxy_route_connections_active", Kind::Gauge, "Open connections.\nBy route.");
        out.sample("smartproxy_route_connections_active", &[("route", "a \"quoted\" \\ name\nx")], 1.5);
        assert_eq!(
            out.finish(),
            "# HELP smartproxy_connections_total Client connections accepted.\n\
             # TYPE smartproxy_connections_total counter\n\
             smartproxy_connections_total 42\n\
             # HELP smartproxy_route_connections_active Open connections.\\nBy route.\n\
             # TYPE smartproxy_route_connections_active gauge\n\
             smartproxy_route_connections_active{route=\"a \\\"quoted\\\" \\\\ name\\nx\"} 1.5\n"
        );
    }

    #[test]
    fn a_histogram_is_cumulative_and_ends_in_inf_sum_and_count() {
        let histogram = Histogram::default();
        histogram.record(Duration::from_micros(80));
        histogram.record(Duration::from_millis(3));
        histogram.record(Duration::from_secs(20));
        let mut out = Exposition::default();
        out.histogram("d", &[("route", "r")], &histogram);
        let text = out.finish();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), DURATION_BOUNDS_MICROS.len() + 3);
        assert_eq!(lines[0], "d_bucket{route=\"r\",le=\"0.0001\"} 1");
        assert!(lines.contains(&"d_bucket{route=\"r\",le=\"0.005\"} 2"), "{text}");
        assert!(lines.contains(&"d_bucket{route=\"r\",le=\"10\"} 2"), "{text}");
        assert_eq!(lines[DURATION_BOUNDS_MICROS.len()], "d_bucket{route=\"r\",le=\"+Inf\"} 3");
        assert_eq!(lines[DURATION_BOUNDS_MICROS.len() + 1], "d_sum{route=\"r\"} 20.00308");
        assert_eq!(lines[DURATION_BOUNDS_MICROS.len() + 2], "d_count{route=\"r\"} 3");
    }
}
