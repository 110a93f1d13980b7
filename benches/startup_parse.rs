//! The first-packet parser on the accept path: a typical libpq StartupMessage, an SSLRequest,
//! a CancelRequest, and a hostile oversized length (rejected from the first 4 bytes).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pgleader::pgwire::{self, parse_first_packet};

fn bench(c: &mut Criterion) {
    let startup = pgwire::encode_startup(
        0,
        &[
            ("user", "vietmarket"),
            ("database", "vietmarket"),
            ("application_name", "psql"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
        ],
    );
    let mut ssl = 8u32.to_be_bytes().to_vec();
    ssl.extend_from_slice(&pgwire::SSL_REQUEST_CODE.to_be_bytes());
    let mut cancel = 16u32.to_be_bytes().to_vec();
    cancel.extend_from_slice(&pgwire::CANCEL_REQUEST_CODE.to_be_bytes());
    cancel.extend_from_slice(&[0, 0, 1, 0, 1, 2, 3, 4]);
    let oversized = 1_000_000u32.to_be_bytes();

    let mut g = c.benchmark_group("parse_first_packet");
    g.bench_function("startup", |b| b.iter(|| parse_first_packet(black_box(&startup))));
    g.bench_function("ssl_request", |b| b.iter(|| parse_first_packet(black_box(&ssl))));
    g.bench_function("cancel_request", |b| b.iter(|| parse_first_packet(black_box(&cancel))));
    g.bench_function("oversized", |b| b.iter(|| parse_first_packet(black_box(&oversized))));
    g.finish();
    c.bench_function("error_response", |b| {
        b.iter(|| pgwire::error_response(black_box("57P03"), black_box("no leader")))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
