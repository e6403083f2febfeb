//! vfio-user over a UNIX socket pair, client and server in this process (two threads):
//! - round trip of 4-byte and 4 KiB region reads and writes;
//! - migration data streaming at `max_data_xfer_size` 1 MiB (aim: at least 1 GB/s), next to a
//!   plain socket stream and `memcpy` of the same bytes measured in the same run;
//! - a `DMA_LOGGING_REPORT` over 1 GiB of mappings with 0.1 % of the pages dirty.
//!
//! `cargo bench -p vmig-vfio-user`.

#![allow(missing_docs)]

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use vmig_primitives::mig_state::MigState;
use vmig_vfio_user::client::Client;
use vmig_vfio_user::server::*;

const STATE: usize = 256 << 20;

struct Bench {
    bar: Vec<u8>,
    ctx: Arc<Mutex<Option<DeviceContext>>>,
}

impl Device for Bench {
    fn spec(&self) -> DeviceSpec {
        DeviceSpec {
            regions: vec![RegionSpec {
                size: 1 << 20,
                readable: true,
                writable: true,
                ..RegionSpec::default()
            }],
            ..DeviceSpec::default()
        }
    }
    fn region_read(&mut self, _: u32, offset: u64, data: &mut [u8]) -> Result<(), Refusal> {
        data.copy_from_slice(
            &self.bar
                [usize::try_from(offset).unwrap()..usize::try_from(offset).unwrap() + data.len()],
        );
        Ok(())
    }
    fn region_write(&mut self, _: u32, offset: u64, data: &[u8]) -> Result<(), Refusal> {
        self.bar[usize::try_from(offset).unwrap()..usize::try_from(offset).unwrap() + data.len()]
            .copy_from_slice(data);
        Ok(())
    }
    fn connect(&mut self, ctx: DeviceContext) {
        *self.ctx.lock().unwrap() = Some(ctx);
    }
    fn migration(&self) -> MigrationSupport {
        MigrationSupport::V2 { pre_copy: false }
    }
    fn save(&mut self, _: bool) -> Result<Vec<u8>, Refusal> {
        Ok(vec![0x5a; STATE])
    }
}

fn connect() -> (Client, Arc<Mutex<Option<DeviceContext>>>) {
    let (a, b) = UnixStream::pair().unwrap();
    let ctx = Arc::new(Mutex::new(None));
    let server = Server::new(
        Bench {
            bar: vec![0; 1 << 20],
            ctx: Arc::clone(&ctx),
        },
        ServerConfig::default(),
    );
    std::thread::spawn(move || {
        let stop = AtomicBool::new(false);
        let _ = server.serve(b, &stop);
    });
    (Client::over(a, None).unwrap(), ctx)
}

/// The limit for a round trip: a 20-byte message and a 20-byte answer between two threads on a
/// socket pair, measured now.
fn socket_ping_pong() -> Duration {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 20];
        while b.read_exact(&mut buf).is_ok() {
            if b.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut buf = [0u8; 20];
    let rounds = 20_000;
    let start = Instant::now();
    for _ in 0..rounds {
        a.write_all(&buf).unwrap();
        a.read_exact(&mut buf).unwrap();
    }
    let each = start.elapsed() / rounds;
    drop(a);
    let _ = echo.join();
    each
}

fn region_round_trips(c: &mut Criterion) {
    println!(
        "socket ping-pong round trip (the limit): {:?}",
        socket_ping_pong()
    );
    let (client, _) = connect();
    let mut group = c.benchmark_group("region");
    for size in [4usize, 4096] {
        let mut buf = vec![0u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("read {size} B"), |b| {
            b.iter(|| client.region_read(0, 0, &mut buf).unwrap())
        });
        group.bench_function(format!("write {size} B"), |b| {
            b.iter(|| client.region_write(0, 0, &buf).unwrap())
        });
    }
    group.finish();
}

/// Streams the 256 MiB state once and prints its rate next to the limits measured now.
fn migration_stream(_: &mut Criterion) {
    let (client, _) = connect();
    let start = Instant::now();
    client.set_mig_state(MigState::StopCopy).unwrap();
    let save = start.elapsed();
    // Stream it the way a migration does: each chunk goes on (here: is dropped) as it comes.
    let start = Instant::now();
    let mut total = 0;
    loop {
        let chunk = client.mig_data_read(1 << 20).unwrap();
        total += chunk.len();
        if chunk.len() < 1 << 20 {
            break;
        }
    }
    let stream = start.elapsed();
    assert_eq!(total, STATE + 4);
    client.set_mig_state(MigState::Stop).unwrap();
    // The limits: one plain stream of the same bytes over a socket pair, and memcpy.
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let payload = vec![0x5au8; STATE];
    let reader = std::thread::spawn(move || {
        let mut sink = vec![0u8; 1 << 20];
        let mut left = STATE;
        while left > 0 {
            left -= b.read(&mut sink).unwrap();
        }
    });
    let start = Instant::now();
    a.write_all(&payload).unwrap();
    reader.join().unwrap();
    let socket = start.elapsed();
    let mut copy = vec![1u8; STATE]; // touched: the limit is the copy, not first-touch faults
    let start = Instant::now();
    copy.copy_from_slice(&payload);
    std::hint::black_box(&copy);
    let memcpy = start.elapsed();
    let rate = |d: Duration| f64::from(u32::try_from(STATE).unwrap()) / d.as_secs_f64() / 1e9;
    println!(
        "migration data, 256 MiB in 1 MiB MIG_DATA_READs: {:.2} GB/s (save {:?}); plain socket stream {:.2} GB/s; memcpy {:.2} GB/s; vfio-user/socket {:.2}",
        rate(stream),
        save,
        rate(socket),
        rate(memcpy),
        rate(stream) / rate(socket)
    );
}

fn logging_report(c: &mut Criterion) {
    let (client, ctx) = connect();
    let ram = vmig_primitives::memfd("bench-ram", 1 << 30).unwrap();
    client
        .dma_map(0, 1 << 30, 3, Some((ram.as_fd(), 0)))
        .unwrap();
    client.dma_logging_start(4096, &[]).unwrap();
    let ctx = ctx.lock().unwrap().clone().unwrap();
    let pages = (1u64 << 30) / 4096;
    let dirty = pages / 1000;
    c.bench_function("DMA_LOGGING_REPORT 1 GiB, 0.1% dirty", |b| {
        b.iter_batched(
            || {
                for i in 0..dirty {
                    ctx.dma_write((i * 7919 % pages) * 4096, &[1]).unwrap();
                }
            },
            |()| client.dma_logging_report(0, 1 << 30, 4096).unwrap(),
            BatchSize::PerIteration,
        )
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = region_round_trips, migration_stream, logging_report
}
criterion_main!(benches);
