//! The status page at `GET /`: what operators used HAProxy's stats page for. One self-contained
//! HTML document (inline CSS, no script, no external assets), rendered on the server from the same
//! [`Status`] snapshot as `/status`, and refreshing itself every 2 seconds. Every string that comes
//! from config or from a backend is HTML-escaped.

use std::fmt::Write;

use super::Status;

/// Renders the page.
pub fn render(status: &Status) -> Vec<u8> {
    let mut h = String::with_capacity(8 * 1024);
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"2\">\
         <title>pgleader: {}</title><style>{CSS}</style></head><body><h1>pgleader</h1>",
        esc(status.leader.as_deref().unwrap_or("no leader"))
    );
    match &status.leader {
        Some(leader) => {
            let _ = write!(
                h,
                "<p class=\"banner ok\">Leader: {} <small>({})</small></p>",
                esc(leader),
                esc(status.reason_text)
            );
        }
        None => {
            let _ = write!(h, "<p class=\"banner bad\">No leader: {}</p>", esc(status.reason_text));
        }
    }
    if status.draining {
        h.push_str("<p class=\"banner bad\">Draining: not accepting new clients</p>");
    }
    let _ = write!(
        h,
        "<p class=\"meta\">epoch {} &middot; config generation {} &middot; split brain: {}</p>",
        status.epoch,
        status.config_generation,
        if status.split_brain { "YES" } else { "no" }
    );

    if let Some(e) = &status.etcd {
        lease(&mut h, e);
    }
    if let Some(r) = &status.read_only {
        let _ = write!(
            h,
            "<h2>Read-only listener</h2><table><tr><th>address</th><td>{}</td></tr>\
             <tr><th>new read sessions go to</th><td class=\"{}\">{}</td></tr>\
             <tr><th>replicas in bounds</th><td>{} <small>(max {} bytes, {} ms; fallback {})</small></td></tr></table>",
            esc(r.listen.as_deref().unwrap_or("-")),
            if r.target.is_some() { "" } else { "err" },
            esc(&r.target.clone().unwrap_or_else(|| format!("nowhere: {}", r.reason.as_deref().unwrap_or("")))),
            r.replicas_in_bounds,
            r.max_lag_bytes,
            r.max_lag_ms,
            r.fallback,
        );
    }
    h.push_str(
        "<h2>Backends</h2><table><tr><th>name</th><th>address</th><th>member</th><th>role</th><th>routable</th>\
         <th>timeline</th><th>lag</th><th>sessions (main / read)</th><th>last check</th><th>checks</th><th>failures</th><th>last error</th></tr>",
    );
    for b in &status.backends {
        let class = match (b.leader, b.role) {
            (true, _) => "leader",
            (_, "down") => "down",
            _ => "",
        };
        let _ = write!(
            h,
            "<tr class=\"{class}\"><td>{}{}</td><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{} / {}</td><td>{}</td><td>{} ({} in a row)</td><td class=\"err\">{}</td></tr>",
            esc(&b.name),
            if b.leader { " &#9733;" } else { "" },
            esc(&b.address),
            match &b.resolved_address {
                Some(r) if *r != b.address => format!(" <small>({})</small>", esc(r)),
                _ => String::new(),
            },
            esc(&b.member),
            b.role,
            if b.routable { "yes" } else { "no" },
            b.timeline.map_or("-".to_owned(), |t| t.to_string()),
            lag_cell(b),
            b.sessions_active,
            b.read_sessions_active,
            b.last_check_ms.map_or("-".to_owned(), |ms| format!("{ms:.1} ms")),
            b.checks_total,
            b.failures_total,
            b.consecutive_failures,
            esc(&[b.member_problem.as_deref(), b.last_error.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("; ")),
        );
    }
    h.push_str("</table><h2>Recent leader changes</h2>");
    if status.events.is_empty() {
        h.push_str("<p class=\"meta\">none yet</p>");
    } else {
        h.push_str("<table><tr><th>time (UTC)</th><th>epoch</th><th>from</th><th>to</th><th>reason</th></tr>");
        for e in status.events.iter().rev() {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                utc(e.at_unix_ms),
                e.epoch,
                esc(e.from.as_deref().unwrap_or("none")),
                esc(e.to.as_deref().unwrap_or("none")),
                esc(e.reason_text)
            );
        }
        h.push_str("</table>");
    }
    h.push_str(
        "<p class=\"meta\"><a href=\"/status\">/status</a> &middot; <a href=\"/metrics\">/metrics</a> &middot; \
         <a href=\"/readyz\">/readyz</a></p></body></html>\n",
    );
    h.into_bytes()
}

/// A replica's lag (bytes / seconds) and, with `[read_only]`, whether it is in bounds.
fn lag_cell(b: &super::status::BackendStatus) -> String {
    let Some(seconds) = b.lag_seconds else { return "-".to_owned() };
    let bytes = b.lag_bytes.map_or_else(|| "?".to_owned(), |n| n.to_string());
    let bounds = match (b.in_read_bounds, b.read_block) {
        (true, _) => " <small>in bounds</small>".to_owned(),
        (false, Some(why)) => format!(" <small class=\"err\">{}</small>", esc(why)),
        (false, None) => String::new(),
    };
    format!("{bytes} B / {seconds:.1} s{bounds}")
}

/// The leader lease as etcd shows it.
fn lease(h: &mut String, e: &super::status::EtcdStatus) {
    let holder = e.leader_member.as_deref().unwrap_or("nobody");
    let confirmation = match &e.confirmation {
        Some(c) if c.valid_for_ms > 0 => format!(
            "{} confirmed {} ms ago (revision {}), valid for {} ms more",
            esc(&c.member),
            c.age_ms,
            c.revision,
            c.valid_for_ms
        ),
        Some(c) => format!("{}'s confirmation ended {} ms ago", esc(&c.member), -c.valid_for_ms),
        None => "no confirmation".to_owned(),
    };
    let _ = write!(
        h,
        "<h2>Leader lease (etcd, {} mode)</h2><table>\
         <tr><th>Patroni's leader key</th><td>{}</td></tr><tr><th>confirmation</th><td>{}</td></tr>\
         <tr><th>etcd</th><td class=\"{}\">{}</td></tr><tr><th>enforcing routes to</th><td>{} <small>({})</small></td></tr>",
        e.mode,
        esc(holder),
        confirmation,
        if e.reachable { "" } else { "err" },
        if e.reachable {
            format!("reachable ({} reads ok, {} failed)", e.reads_ok, e.reads_failed)
        } else {
            format!("unreachable: {}", esc(e.last_error.as_deref().unwrap_or("no read has succeeded yet")))
        },
        esc(e.enforced_leader.as_deref().unwrap_or("none")),
        esc(e.enforced_reason),
    );
    if e.failsafe_fallback {
        h.push_str("<tr><th>fail-safe</th><td class=\"err\">ACTIVE: etcd unreachable, routing on SQL alone</td></tr>");
    }
    if e.paused {
        h.push_str("<tr><th>Patroni</th><td class=\"err\">paused (maintenance mode)</td></tr>");
    }
    if let Some(why) = &e.revoked {
        let _ = write!(h, "<tr><th>revoked</th><td>{}</td></tr>", esc(why));
    }
    h.push_str("</table>");
}

const CSS: &str = "body{font:14px system-ui,sans-serif;margin:2em;color:#222}h1{margin:0 0 .5em}\
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}\
th{background:#f0f0f0}.banner{font-size:1.3em;padding:.4em .8em;display:inline-block;border-radius:4px}\
.ok{background:#d9f2d9}.bad{background:#f8d0d0}.leader{background:#e9f7e9}.down{background:#fbe3e3}\
.err{color:#a00;max-width:40em}.meta{color:#666}";

/// Minimal HTML escaping for text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `YYYY-MM-DD HH:MM:SS` from Unix milliseconds (civil-from-days, proleptic Gregorian).
fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_formats() {
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_795_734_000_000), "2026-11-26 23:00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
    }
}
