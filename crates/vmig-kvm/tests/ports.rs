//! Guest port I/O beyond the guest's own report ports: the port handler the layer above
//! installs, and the port script vCPU 0 runs with real `out` / `in` instructions.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmig_kvm::guest::{MAX_PORT_OPS, PORT_VERIFY_DONE};
use vmig_kvm::{DirtyLogMode, KvmError, MmioError, PortHandler, PortOp, Vm, VmConfig};
use vmig_primitives::GuestAddress;

fn config(vcpus: usize, workload: &str) -> VmConfig {
    common::vm_config(DirtyLogMode::Bitmap, vcpus, workload)
}

const UART: u16 = 0xc000;
const LSR: u16 = UART + 5;
const SCR: u16 = UART + 7;

/// One access as the handler saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Out(u16, u8),
    In(u16, u8),
}

/// A test double of a loopback UART at ports `0xc000..0xc008`: bytes written to THR (offset
/// 0) come back from RX (offset 0), LSR (offset 5) says whether one is waiting, SCR (offset 7)
/// holds a byte; every access is recorded in order.
#[derive(Default)]
struct LoopbackUart {
    state: Mutex<(Vec<u8>, u8, Vec<Access>)>,
}

impl LoopbackUart {
    fn log(&self) -> Vec<Access> {
        self.state.lock().unwrap().2.clone()
    }
}

impl PortHandler for LoopbackUart {
    fn read(&self, port: u16, data: &mut [u8]) -> Result<(), MmioError> {
        let unclaimed = MmioError::Unclaimed {
            addr: u64::from(port),
            len: data.len(),
        };
        if !(UART..UART + 8).contains(&port) || data.len() != 1 {
            return Err(unclaimed);
        }
        let mut state = self.state.lock().unwrap();
        let (fifo, scr, log) = &mut *state;
        let value = match port {
            UART if fifo.is_empty() => 0,
            UART => fifo.remove(0),
            LSR => u8::from(!fifo.is_empty()),
            SCR => *scr,
            _ => 0,
        };
        data[0] = value;
        log.push(Access::In(port, value));
        Ok(())
    }

    fn write(&self, port: u16, data: &[u8]) -> Result<(), MmioError> {
        if !(UART..UART + 8).contains(&port) || data.len() != 1 {
            return Err(MmioError::Unclaimed {
                addr: u64::from(port),
                len: data.len(),
            });
        }
        let mut state = self.state.lock().unwrap();
        let (fifo, scr, log) = &mut *state;
        match port {
            UART => fifo.push(data[0]),
            SCR => *scr = data[0],
            _ => {}
        }
        log.push(Access::Out(port, data[0]));
        Ok(())
    }
}

/// "vCPU 0 runs the script with real port instructions, in order": every access reaches the
/// handler in the script's order with the script's values, the bytes read come back in order,
/// and the guest's write loop, pacing and verify go on around it on every vCPU.
#[test]
fn a_port_script_runs_in_order_through_the_port_handler_and_disturbs_nothing() {
    require_kvm!();
    let vm = Vm::new(&config(3, "random,rate=30000")).unwrap();
    let uart = Arc::new(LoopbackUart::default());
    vm.set_port_handler(Some(Arc::clone(&uart) as _));
    vm.resume().unwrap();
    common::wait_for_writes(&vm, 500);
    let script = [
        PortOp::Out {
            port: UART,
            value: b'v',
        },
        PortOp::Out {
            port: UART,
            value: b'm',
        },
        PortOp::Out {
            port: SCR,
            value: 0x5a,
        },
        PortOp::In { port: LSR },
        PortOp::In { port: UART },
        PortOp::In { port: UART },
        PortOp::In { port: LSR },
        PortOp::In { port: SCR },
    ];
    let reads = vm
        .run_port_script(&script, Duration::from_secs(10))
        .unwrap();
    assert_eq!(reads, [1, b'v', b'm', 0, 0x5a]);
    assert_eq!(
        uart.log(),
        [
            Access::Out(UART, b'v'),
            Access::Out(UART, b'm'),
            Access::Out(SCR, 0x5a),
            Access::In(LSR, 1),
            Access::In(UART, b'v'),
            Access::In(UART, b'm'),
            Access::In(LSR, 0),
            Access::In(SCR, 0x5a),
        ]
    );
    // Around verifies, and again and again: each script runs once, whole.
    for round in 0..5u8 {
        let report = vm.verify(Duration::from_secs(30)).unwrap();
        assert!(report.passed(), "round {round}: {report:?}");
        let reads = vm
            .run_port_script(
                &[
                    PortOp::Out {
                        port: UART,
                        value: round,
                    },
                    PortOp::In { port: UART },
                ],
                Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(reads, [round], "round {round}");
    }
    assert_eq!(uart.log().len(), 8 + 5 * 2, "{:?}", uart.log());
    // An empty script is a round trip through vCPU 0's batch boundary.
    assert!(
        vm.run_port_script(&[], Duration::from_secs(10))
            .unwrap()
            .is_empty()
    );
    let writes = vm.guest_writes().unwrap();
    common::wait_for_writes(&vm, writes + 100);
    let (_, pace_exits) = vm.exit_counts();
    assert!(pace_exits > 0, "the guest stopped asking to be paced");
    vm.check_vcpus().unwrap();
    vm.pause().unwrap();
}

/// A script that cannot run is refused before the guest sees it, saying why.
#[test]
fn a_port_script_is_refused_while_paused_when_too_long_or_on_a_report_port() {
    require_kvm!();
    let vm = Vm::new(&config(1, "random")).unwrap();
    vm.set_port_handler(Some(Arc::new(LoopbackUart::default()) as _));
    let one = [PortOp::In { port: LSR }];
    let err = vm
        .run_port_script(&one, Duration::from_secs(1))
        .unwrap_err();
    assert!(
        matches!(err, KvmError::Order(_)) && err.to_string().contains("resume the VM first"),
        "{err}"
    );
    vm.resume().unwrap();
    let long = vec![PortOp::In { port: LSR }; MAX_PORT_OPS + 1];
    let err = vm
        .run_port_script(&long, Duration::from_secs(1))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("a port script of 65 operations: expected at most 64"),
        "{err}"
    );
    let report = [PortOp::Out {
        port: PORT_VERIFY_DONE,
        value: 1,
    }];
    let err = vm
        .run_port_script(&report, Duration::from_secs(1))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("may not touch I/O port 0x512: ports 0x510-0x513 are the guest's own"),
        "{err}"
    );
    // None of them reached the guest: the next one runs.
    assert_eq!(
        vm.run_port_script(&one, Duration::from_secs(10)).unwrap(),
        [0]
    );
    let report = vm.verify(Duration::from_secs(30)).unwrap();
    assert!(report.passed(), "{report:?}");
}

/// "Unclaimed ports keep failing the vCPU with a clear message": without a handler, and with
/// one that does not claim the port, the script's access stops vCPU 0 and the call says which
/// port and why.
#[test]
fn a_script_port_nothing_claims_stops_vcpu_0_naming_the_port() {
    require_kvm!();
    for with_handler in [false, true] {
        let vm = Vm::new(&config(2, "random")).unwrap();
        if with_handler {
            vm.set_port_handler(Some(Arc::new(LoopbackUart::default()) as _));
        }
        vm.resume().unwrap();
        let err = vm
            .run_port_script(
                &[PortOp::Out {
                    port: 0x80,
                    value: 1,
                }],
                Duration::from_secs(10),
            )
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, KvmError::VcpuStopped(_)), "{err:?}");
        let why = if with_handler {
            "vCPU 0 wrote to I/O port 0x80: no device is at [0x80, +1)"
        } else {
            "vCPU 0 wrote to I/O port 0x80, which has no device"
        };
        assert!(text.contains(why), "{text}");
        // A read: the same, and the handler fills what the guest reads (checked above).
        let vm = Vm::new(&config(1, "random")).unwrap();
        if with_handler {
            vm.set_port_handler(Some(Arc::new(LoopbackUart::default()) as _));
        }
        vm.resume().unwrap();
        let err = vm
            .run_port_script(&[PortOp::In { port: 0x3f8 }], Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        let why = if with_handler {
            "vCPU 0 read I/O port 0x3f8: no device is at [0x3f8, +1)"
        } else {
            "vCPU 0 read I/O port 0x3f8, which has no device"
        };
        assert!(err.contains(why), "{err}");
    }
}

/// The script's words live in guest memory: a guest restored into a fresh VM takes the next
/// script after the last one it ran.
#[test]
fn a_restored_guest_takes_the_next_port_script() {
    require_kvm!();
    let source = Vm::new(&config(2, "random")).unwrap();
    let uart = Arc::new(LoopbackUart::default());
    source.set_port_handler(Some(Arc::clone(&uart) as _));
    source.resume().unwrap();
    source
        .run_port_script(
            &[PortOp::Out {
                port: UART,
                value: 7,
            }],
            Duration::from_secs(10),
        )
        .unwrap();
    source.pause().unwrap();
    let states = source.save_vcpus().unwrap();
    let copy = |into: &vmig_kvm::GuestMemory| -> vmig_kvm::Result<()> {
        let mut page = vec![0u8; usize::try_from(vmig_kvm::PAGE_SIZE).unwrap()];
        for slot in source.memory().slots() {
            for i in 0..slot.layout.pages() {
                let gpa = GuestAddress(slot.layout.gpa + i * vmig_kvm::PAGE_SIZE);
                source.memory().read(gpa, &mut page)?;
                if page.iter().any(|&b| b != 0) {
                    into.write(gpa, &page)?;
                }
            }
        }
        Ok(())
    };
    let target = Vm::restore(source.config(), &states, copy).unwrap();
    drop(source);
    // The same device state, as a migrated device brings it.
    target.set_port_handler(Some(Arc::clone(&uart) as _));
    target.resume().unwrap();
    let reads = target
        .run_port_script(
            &[PortOp::In { port: LSR }, PortOp::In { port: UART }],
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(reads, [1, 7]);
    let report = target.verify(Duration::from_secs(30)).unwrap();
    assert!(report.passed(), "{report:?}");
}
