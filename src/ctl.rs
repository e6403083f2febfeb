//! `vmig ctl` (one QMP command to a VM's control socket) and `vmig migrate` (start a migration
//! and follow it to the end with a progress bar and a summary), both over QMP.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value, json};
use vmig_migration::{MigrationReport, Status};

use crate::qmp::QmpClient;
use crate::qmp::names::qmp_status;

/// Send one QMP command to a VM's control socket (`vmig run --api PATH`, or QEMU's `-qmp`)
/// and print the reply.
///
/// Commands (QEMU's names): migrate uri=URI; migrate-incoming uri=URI; migrate_cancel;
/// migrate-set-parameters [downtime-limit=MS] [max-bandwidth=BYTES_PER_S] [multifd-channels=N]
/// [x-vmig-timeout=S] [x-vmig-verify-memory=BOOL] [x-vmig-device-dirty-tracking=BOOL];
/// query-migrate-parameters; migrate-set-capabilities '{"capabilities": [{"capability":
/// "auto-converge", "state": true}]}' (capabilities auto-converge, events, multifd);
/// query-migrate-capabilities; query-migrate; query-status; stop; cont; quit; query-version;
/// query-commands; and vmig's own x-vmig-guest-port-io ops=out:PORT:BYTE,in:PORT,... (the
/// running guest does that port I/O to its devices' I/O BARs; the reply lists the bytes read).
/// Exits 1 when the VM answers with an error.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The control socket.
    socket: PathBuf,
    /// The command.
    command: String,
    /// Arguments as KEY=VALUE (numbers and true/false are sent as such), or one JSON object.
    #[arg(value_name = "KEY=VALUE")]
    arguments: Vec<String>,
}

/// Migrate a VM (`vmig run --api PATH`) and follow the migration to its end.
///
/// Shows a progress bar while it runs, then a summary (or the report as JSON). Exits 0 only
/// when the migration completed and the destination verified it; 3 when its outcome is
/// unknown (the commit was sent, the destination never answered).
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The source VM's control socket.
    socket: PathBuf,
    /// Where to: tcp:HOST:PORT or unix:PATH (a `vmig run --incoming` there).
    uri: String,
    /// Longest pause the guest may see, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = vmig_migration::report::DEFAULT_DOWNTIME_MS)]
    downtime_ms: u64,
    /// Bytes per second the migration may use (0: unlimited).
    #[arg(long, value_name = "BYTES_PER_S", default_value_t = 0)]
    max_bandwidth: u64,
    /// Connections carrying pages in parallel.
    #[arg(long, value_name = "N", default_value_t = 1)]
    connections: u16,
    /// Print the final report as JSON instead of the summary.
    #[arg(long)]
    json: bool,
}

fn parse_argument(text: &str) -> Result<(String, Value), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("argument `{text}`: expected KEY=VALUE"))?;
    let value = match serde_json::from_str::<Value>(value) {
        Ok(v @ (Value::Number(_) | Value::Bool(_))) => v,
        _ => Value::String(value.to_string()),
    };
    Ok((key.to_string(), value))
}

fn parse_arguments(texts: &[String]) -> Result<Value, String> {
    if let [text] = texts
        && text.trim_start().starts_with('{')
    {
        return match serde_json::from_str::<Value>(text) {
            Ok(object @ Value::Object(_)) => Ok(object),
            _ => Err(format!("arguments `{text}`: expected one JSON object")),
        };
    }
    let mut arguments = Map::new();
    for a in texts {
        let (k, v) = parse_argument(a)?;
        arguments.insert(k, v);
    }
    Ok(Value::Object(arguments))
}

pub fn ctl(args: &CtlArgs) -> Result<ExitCode, String> {
    let arguments = parse_arguments(&args.arguments)?;
    let mut client = QmpClient::connect(&args.socket, Duration::ZERO)?;
    let reply = client.call(&args.command, arguments)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&reply).unwrap_or_default()
    );
    Ok(if reply.get("error").is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub fn migrate(args: &MigrateArgs) -> Result<ExitCode, String> {
    let mut client = QmpClient::connect(&args.socket, Duration::ZERO)?;
    let report = follow_migration(
        &mut client,
        &args.uri,
        json!({
            "downtime-limit": args.downtime_ms,
            "max-bandwidth": args.max_bandwidth,
            "multifd-channels": args.connections,
        }),
    )?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print_summary(&report);
    }
    Ok(match report.status {
        Status::Completed if report.verified => ExitCode::SUCCESS,
        Status::Unknown => ExitCode::from(crate::run::OUTCOME_UNKNOWN),
        _ => ExitCode::FAILURE,
    })
}

/// Sets `parameters` (`migrate-set-parameters`; more than one `multifd-channels` turns on
/// the `multifd` capability), starts a migration to `uri` through `client` and polls it to
/// the end, drawing a progress bar on a terminal; returns the final report.
pub fn follow_migration(
    client: &mut QmpClient,
    uri: &str,
    parameters: Value,
) -> Result<MigrationReport, String> {
    let multifd = parameters["multifd-channels"].as_u64().unwrap_or(1) > 1;
    client.execute("migrate-set-parameters", parameters)?;
    client.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifd", "state": multifd}]}),
    )?;
    client.execute("migrate", json!({ "uri": uri }))?;
    let bar = ProgressBar::new(100);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{bar:32}] {percent:>3}% {msg}",
        )
        .map_err(|e| e.to_string())?
        .progress_chars("=> "),
    );
    let report = loop {
        let value = client.execute("query-migrate", json!({}))?;
        let report = crate::qmp::names::from_query_migrate(&value)?;
        // Events are not needed here: the polling sees every state the bar shows.
        client.take_events();
        let ram = &report.ram;
        let done = if ram.total == 0 {
            0
        } else {
            (ram.normal_pages + ram.zero_pages + ram.sparse_pages)
                * vmig_primitives::PAGE_SIZE
                * 100
                / ram.total.max(1)
        };
        bar.set_position(done.min(100));
        bar.set_message(format!(
            "{} · pass {} · {} MiB sent · {} MiB dirty · {:.0} Mbit/s{}",
            qmp_status(report.status),
            report.passes,
            ram.transferred >> 20,
            ram.remaining >> 20,
            ram.mbps,
            if report.throttle_percent > 0 {
                format!(" · throttle {}%", report.throttle_percent)
            } else {
                String::new()
            }
        ));
        if report.status.is_final() {
            break report;
        }
        bar.tick();
        std::thread::sleep(Duration::from_millis(100));
    };
    bar.finish_and_clear();
    Ok(report)
}

#[expect(clippy::cast_precision_loss, reason = "a figure to print")]
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// Prints the report for a person.
#[expect(clippy::cast_precision_loss, reason = "figures to print")]
pub fn print_summary(report: &MigrationReport) {
    let seconds = (report.total_ms as f64 / 1000.0).max(0.001);
    println!("status        {}", report.status.name());
    if let Some(error) = &report.error {
        println!("error         {error}");
    }
    println!(
        "total time    {} ms (setup {} ms)",
        report.total_ms, report.setup_ms
    );
    println!(
        "downtime      {} ms (expected {} ms)",
        report.downtime_ms, report.expected_downtime_ms
    );
    println!("passes        {}", report.passes);
    let ram = &report.ram;
    println!(
        "ram           {} sent of {} ({} pages with data, {} sparse, {} zero pages), {:.0} Mbit/s",
        mib(ram.transferred),
        mib(ram.total),
        ram.normal_pages,
        ram.sparse_pages,
        ram.zero_pages,
        ram.mbps
    );
    for source in &report.dirty_sources {
        println!(
            "dirty pages   {:<36} {:>8} pages ({:.0} pages/s)",
            source.name,
            source.pages,
            source.pages as f64 / seconds
        );
    }
    for d in &report.devices {
        println!(
            "device state  {:<20} {}  pre-copy {} B, stop-and-copy {} B",
            d.name, d.protocol, d.precopy_bytes, d.stopcopy_bytes
        );
        match &d.mediation {
            Some(m) if m.trapped => println!(
                "mediator      {:<20} {} (handle {}) trapped {} doorbell writes, one exit each, {:.0} us each in the VMM",
                d.name,
                m.mediator,
                m.handle,
                m.trapped_writes,
                m.mean_write_ns as f64 / 1000.0
            ),
            Some(m) => println!(
                "mediator      {:<20} {} (handle {}) did not trap: the device's DMA is tracked without it",
                d.name, m.mediator, m.handle
            ),
            None => {}
        }
    }
    if report.throttle_percent > 0 {
        println!(
            "auto-converge throttled the vCPUs to {}%",
            report.throttle_percent
        );
    }
    if let Some(v) = &report.verification {
        let torn = if v.pages_torn > 0 {
            format!(
                "; {} pages changed as they were sent and came again",
                v.pages_torn
            )
        } else {
            String::new()
        };
        let audited = if v.pages_audited > 0 {
            format!(
                "; {} pages audited after resuming, {} changed unreported",
                v.pages_audited, v.pages_changed_unreported
            )
        } else {
            String::new()
        };
        println!(
            "verification  {} pages and {} device states compared before resuming{torn}{audited}; guest verify: {} pages, {} bad; {} device record rings checked",
            v.pages_compared,
            v.devices_compared,
            v.guest_pages_checked,
            v.guest_bad_pages,
            v.device_records.len()
        );
        for p in &v.problems {
            println!("  problem: {p}");
        }
    }
    println!("verified      {}", report.verified);
}
