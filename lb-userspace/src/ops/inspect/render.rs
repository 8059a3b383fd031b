//! Views as text: aligned tables for people (in the manner of `cilium service list`) and JSON
//! for scripts. Pure functions of the views; nothing here reads a map.
use std::fmt::Write as _;

use serde::Serialize;

use super::{
    BackendView, CtView, Explanation, InspectError, Outcome, Pick, RingMember, ServiceView,
    StatView, scope_origin,
};

/// Pretty-printed JSON of any view, with a final newline.
pub fn json<T: Serialize + ?Sized>(view: &T) -> Result<String, InspectError> {
    let mut s = serde_json::to_string_pretty(view).map_err(InspectError::Json)?;
    s.push('\n');
    Ok(s)
}

/// Columns separated by two spaces and padded to their widest cell; the last column is not
/// padded, so no line ends in spaces.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Self {
            rows: vec![header.iter().map(ToString::to_string).collect()],
        }
    }

    /// A table without a header line.
    fn headless() -> Self {
        Self { rows: Vec::new() }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn locality(local: bool) -> &'static str {
    if local { "local" } else { "remote" }
}

/// "1 => 10.244.1.5:8080 (local, gen 1, 103 slots)".
fn ring_member(m: &RingMember) -> String {
    match &m.backend {
        Some(b) => format!(
            "{} => {} ({}, gen {}, {} slots)",
            m.id,
            b.endpoint(),
            locality(b.local),
            b.generation,
            m.slots
        ),
        None => format!("{} => (cleared id, {} slots)", m.id, m.slots),
    }
}

fn flags(v: &ServiceView) -> String {
    if v.flags.is_empty() {
        "-".into()
    } else {
        v.flags.join(",")
    }
}

fn ring(v: &ServiceView) -> String {
    if v.ring_size == 0 {
        "empty".into()
    } else {
        format!("{}@{}", v.ring_size, v.ring_offset)
    }
}

/// `xlb service list`: one frontend per row, its ring's backends on the following lines.
#[must_use]
pub fn services_table(views: &[ServiceView]) -> String {
    let mut t = Table::new(&["ID", "FRONTEND", "SCOPE", "FLAGS", "RING", "BACKENDS"]);
    for v in views {
        let mut members = v.backends.iter().map(ring_member);
        t.row(vec![
            v.service_id.to_string(),
            v.frontend(),
            v.scope.clone(),
            flags(v),
            ring(v),
            members
                .next()
                .unwrap_or_else(|| "(none: traffic is dropped)".into()),
        ]);
        for m in members {
            t.row(vec![
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                m,
            ]);
        }
    }
    t.render()
}

/// `xlb backend list`.
#[must_use]
pub fn backends_table(views: &[BackendView]) -> String {
    let mut t = Table::new(&["ID", "ADDRESS", "LOCALITY", "GENERATION"]);
    for b in views {
        t.row(vec![
            b.id.to_string(),
            b.endpoint().to_string(),
            locality(b.local).into(),
            b.generation.to_string(),
        ]);
    }
    t.render()
}

fn ct_backend(v: &CtView) -> String {
    match v.backend {
        Some(b) => format!("{b} (id {})", v.backend_id),
        None => format!("id {} gen {} (gone)", v.backend_id, v.backend_generation),
    }
}

fn ct_nat(v: &CtView) -> String {
    match (v.snat, v.reply_source) {
        (Some(s), _) => format!("SNAT src {s}"),
        (None, Some(r)) => format!("reply src {r}"),
        (None, None) => "-".into(),
    }
}

/// `xlb conntrack list`.
#[must_use]
pub fn conntrack_table(views: &[CtView]) -> String {
    let mut t = Table::new(&[
        "KIND",
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "BACKEND",
        "SERVICE",
        "NAT",
    ]);
    for v in views {
        t.row(vec![
            v.kind.into(),
            v.proto.clone(),
            v.src.to_string(),
            v.dst.to_string(),
            ct_backend(v),
            v.service_id.to_string(),
            ct_nat(v),
        ]);
    }
    t.render()
}

/// `xlb stats`.
#[must_use]
pub fn stats_table(views: &[StatView]) -> String {
    let mut t = Table::new(&["VERDICT", "PACKETS", "BYTES"]);
    for s in views {
        t.row(vec![
            s.verdict.into(),
            s.packets.to_string(),
            s.bytes.to_string(),
        ]);
    }
    t.render()
}

fn pick_lines(p: &Pick) -> Vec<String> {
    let verdict = p.verdict.unwrap_or("-");
    let head = match (p.outcome, &p.backend) {
        (Outcome::Established | Outcome::NewFlow, Some(b)) => format!(
            "→ backend {} {} ({})",
            b.id,
            b.endpoint(),
            locality(b.local)
        ),
        (Outcome::Reply, _) => format!("→ reply, reverse-translated ({verdict})"),
        (Outcome::NotService, _) => format!("→ passed untouched ({verdict})"),
        _ => format!("→ dropped ({verdict})"),
    };
    vec![head, p.reason.clone()]
}

/// `xlb explain`: per scope, the frontend, its eligible backends, why, and the client's pick.
#[must_use]
pub fn explanation_text(e: &Explanation) -> String {
    let mut out = String::new();
    let _ = write!(out, "{}", e.target);
    if let Some(from) = e.from {
        let _ = write!(out, " from {from}");
    }
    out.push('\n');
    for s in &e.scopes {
        let _ = writeln!(out, "\n{} scope: {}", s.scope, scope_origin(&s.scope));
        let mut t = Table::headless();
        let label = |t: &mut Table, name: &str, value: String| {
            t.row(vec![format!("  {name}"), value]);
        };
        match &s.frontend {
            Some(v) => {
                label(
                    &mut t,
                    "frontend",
                    format!(
                        "service {}, flags {}, ring {}",
                        v.service_id,
                        flags(v),
                        if v.ring_size == 0 {
                            "empty".to_string()
                        } else {
                            format!("{} slots at offset {}", v.ring_size, v.ring_offset)
                        }
                    ),
                );
                let mut members = v.backends.iter().map(ring_member);
                label(
                    &mut t,
                    "backends",
                    members.next().unwrap_or_else(|| "none".into()),
                );
                for m in members {
                    label(&mut t, "", m);
                }
            }
            None => label(&mut t, "frontend", "none".into()),
        }
        let mut notes = s.notes.iter();
        if let Some(n) = notes.next() {
            label(&mut t, "why", n.clone());
        }
        for n in notes {
            label(&mut t, "", n.clone());
        }
        if let Some(p) = &s.pick {
            let mut lines = pick_lines(p).into_iter();
            if let Some(l) = lines.next() {
                label(&mut t, "client", l);
            }
            for l in lines {
                label(&mut t, "", l);
            }
        }
        out.push_str(&t.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::{RingMember, Table, ring_member};
    use crate::ops::inspect::BackendView;

    #[test]
    fn table_pads_all_but_the_last_column() {
        let mut t = Table::new(&["A", "BB", "C"]);
        t.row(vec!["xxx".into(), "y".into(), "z".into()]);
        t.row(vec![String::new(), String::new(), "w".into()]);
        assert_eq!(t.render(), "A    BB  C\nxxx  y   z\n         w\n");
    }

    #[test]
    fn ring_member_names_a_cleared_id() {
        let m = RingMember {
            id: 7,
            slots: 3,
            backend: None,
        };
        assert_eq!(ring_member(&m), "7 => (cleared id, 3 slots)");
        let m = RingMember {
            id: 1,
            slots: 103,
            backend: Some(BackendView {
                id: 1,
                addr: Ipv4Addr::new(10, 244, 1, 5),
                port: 8080,
                local: true,
                generation: 2,
            }),
        };
        assert_eq!(
            ring_member(&m),
            "1 => 10.244.1.5:8080 (local, gen 2, 103 slots)"
        );
    }
}
