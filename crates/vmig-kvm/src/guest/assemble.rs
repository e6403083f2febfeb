//! The guest's code, assembled at run time: the write loop (page choice, stamp, journal), the
//! driver's doorbells, the port script, pacing, and the verify between two barriers.

use iced_x86::code_asm::*;

use super::GuestProgram;
use super::WorkloadKind;
use super::layout::{CODE_GPA, CONTROL_GPA, JOURNAL_GPA, WS_VA};
use super::protocol::*;
use super::verify::{CHECKSUM_K, STAMP_MAGIC};
use crate::error::{KvmError, Result};
use crate::memory::PAGE_SIZE;

impl GuestProgram {
    pub(super) fn assemble(&self) -> Result<Vec<u8>> {
        self.assemble_code().map_err(KvmError::Assemble)
    }

    #[allow(clippy::too_many_lines)]
    fn assemble_code(&self) -> std::result::Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        let batch = self.batch();
        let hot_threshold = u64::from(self.workload.hot_percent) * 256 / 100;
        let mut write_loop = a.create_label();
        let mut pick_done = a.create_label();
        let mut batch_end = a.create_label();
        let mut verify = a.create_label();

        // Prologue: r15 = vCPU block (set by the VMM).
        a.mov(rax, qword_ptr(r15 + VB_RANGE_LO))?;
        a.mov(r14, rax)?;
        a.shl(r14, 12)?;
        a.mov(rcx, WS_VA)?;
        a.add(r14, rcx)?; // r14 = VA of the range's first page
        a.mov(r10, rax)?;
        a.shl(r10, 3)?;
        a.mov(rcx, JOURNAL_GPA)?;
        a.add(r10, rcx)?; // r10 = journal of the range
        a.mov(r13, qword_ptr(r15 + VB_RANGE_PAGES))?;
        a.mov(r12, qword_ptr(r15 + VB_SEED))?;
        a.mov(r11, qword_ptr(r15 + VB_WRITES))?;
        a.mov(r8, qword_ptr(r15 + VB_TAG))?;
        a.mov(rbp, qword_ptr(r15 + VB_HOT_PAGES))?;
        a.mov(rbx, qword_ptr(r15 + VB_SEQ_START))?;
        a.mov(r9, batch)?;

        a.set_label(&mut write_loop)?;
        // rax = page index in [0, r13)
        match self.workload.kind {
            WorkloadKind::Sequential => {
                let mut no_wrap = a.create_label();
                a.mov(rax, rbx)?;
                a.inc(rbx)?;
                a.cmp(rbx, r13)?;
                a.jb(no_wrap)?;
                a.xor(ebx, ebx)?;
                a.set_label(&mut no_wrap)?;
                a.cmp(rax, r13)?;
                a.jb(pick_done)?;
                a.xor(eax, eax)?;
            }
            WorkloadKind::Random | WorkloadKind::HotCold => {
                // xorshift64*
                a.mov(rax, r12)?;
                a.shr(rax, 12)?;
                a.xor(r12, rax)?;
                a.mov(rax, r12)?;
                a.shl(rax, 25)?;
                a.xor(r12, rax)?;
                a.mov(rax, r12)?;
                a.shr(rax, 27)?;
                a.xor(r12, rax)?;
                a.mov(rax, r12)?;
                a.mov(rcx, 0x2545_f491_4f6c_dd1du64)?;
                a.imul_2(rax, rcx)?;
                a.mov(rcx, r13)?;
                if self.workload.kind == WorkloadKind::HotCold {
                    let mut cold = a.create_label();
                    a.movzx(edx, al)?;
                    a.cmp(
                        edx,
                        u32::try_from(hot_threshold).expect("a threshold of at most 256"),
                    )?;
                    a.jae(cold)?;
                    a.mov(rcx, rbp)?;
                    a.set_label(&mut cold)?;
                }
                a.shr(rax, 32)?;
                a.imul_2(rax, rcx)?;
                a.shr(rax, 32)?;
            }
        }
        a.set_label(&mut pick_done)?;
        if self.workload.shared {
            // Try-lock the page through bit 63 of its journal entry; busy → pick another.
            a.lock().bts(qword_ptr(r10 + rax * 8), 63)?;
            a.jc(write_loop)?;
        }
        a.mov(rsi, rax)?;
        a.shl(rsi, 12)?;
        a.add(rsi, r14)?; // rsi = page VA
        a.mov(rdx, qword_ptr(r15 + VB_RANGE_LO))?;
        a.add(rdx, rax)?;
        a.mov(rcx, STAMP_MAGIC)?;
        a.or(rdx, rcx)?; // rdx = head
        a.mov(qword_ptr(rsi), rdx)?;
        a.mov(rcx, CONTROL_GPA)?;
        a.mov(rcx, qword_ptr(rcx + CTL_EPOCH))?; // rcx = epoch
        a.mov(qword_ptr(rsi + 8), rcx)?;
        a.inc(r11)?;
        a.mov(rdi, r11)?;
        a.or(rdi, r8)?; // rdi = tag
        a.mov(qword_ptr(rsi + 16), rdi)?;
        a.xor(rdx, rcx)?;
        a.xor(rdx, rdi)?;
        a.mov(rcx, CHECKSUM_K)?;
        a.imul_2(rdx, rcx)?;
        a.mov(qword_ptr(rsi + 24), rdx)?;
        a.mov(qword_ptr(rsi + (PAGE_SIZE - 8)), rdi)?;
        a.mov(qword_ptr(r10 + rax * 8), rdi)?; // journal; releases the shared try-lock
        a.mov(qword_ptr(r15 + VB_WRITES), r11)?;
        a.dec(r9)?;
        a.jz(batch_end)?;
        a.jmp(write_loop)?;

        a.set_label(&mut batch_end)?;
        a.mov(r9, batch)?;
        // vCPU 0 is the devices' driver: for each doorbell it reads what the device produced
        // and writes it back as consumed (one or two MMIO exits per device and batch: the
        // read does not exit when it hits a mapped status page).
        let mut doorbells_done = a.create_label();
        let mut doorbell = a.create_label();
        a.test(r8, r8)?;
        a.jnz(doorbells_done)?;
        a.mov(rcx, CONTROL_GPA)?;
        a.mov(rdi, qword_ptr(rcx + CTL_DOORBELL_COUNT))?;
        a.lea(rsi, qword_ptr(rcx + CTL_DOORBELLS))?;
        a.set_label(&mut doorbell)?;
        a.test(rdi, rdi)?;
        a.jz(doorbells_done)?;
        a.mov(rdx, qword_ptr(rsi))?;
        a.mov(rax, qword_ptr(rdx))?;
        a.mov(rdx, qword_ptr(rsi + 8))?;
        a.mov(qword_ptr(rdx), rax)?;
        a.add(rsi, 16)?;
        a.dec(rdi)?;
        a.jmp(doorbell)?;
        a.set_label(&mut doorbells_done)?;
        self.port_script(&mut a)?;
        if self.workload.rate.is_some() {
            a.mov(dx, u32::from(PORT_PACE))?;
            a.mov(
                eax,
                u32::try_from(batch).expect("a batch is at most 64 pages"),
            )?;
            a.out(dx, eax)?;
        }
        a.mov(rcx, CONTROL_GPA)?;
        a.mov(rax, qword_ptr(rcx + CTL_CMD_SEQ))?;
        a.cmp(rax, qword_ptr(r15 + VB_SEEN_SEQ))?;
        a.je(write_loop)?;
        a.mov(qword_ptr(r15 + VB_SEEN_SEQ), rax)?;
        a.mov(rax, qword_ptr(rcx + CTL_CMD))?;
        a.cmp(
            rax,
            i32::try_from(CMD_VERIFY).expect("a command number is small"),
        )?;
        a.je(verify)?;
        a.jmp(write_loop)?;

        // verify: barrier A, check the slice, report, barrier B.
        a.set_label(&mut verify)?;
        // rbp = the barriers' target for this verify: the counters only grow, by one per vCPU
        // per verify, so generation g is complete at vcpus × g.
        a.mov(rcx, CONTROL_GPA)?;
        a.mov(rbp, qword_ptr(rcx + CTL_VERIFY_GEN))?;
        a.imul_3(
            rbp,
            rbp,
            i32::try_from(self.vcpus).expect("at most MAX_VCPUS vCPUs"),
        )?;
        self.barrier(&mut a, CTL_BARRIER_A)?;
        let mut check_loop = a.create_label();
        let mut written = a.create_label();
        let mut bad = a.create_label();
        let mut next = a.create_label();
        let mut checked = a.create_label();
        a.mov(rcx, qword_ptr(r15 + VB_SLICE_LO))?; // rcx = page index
        a.mov(rdi, qword_ptr(r15 + VB_SLICE_PAGES))?;
        a.add(rdi, rcx)?; // rdi = end
        a.xor(ebx, ebx)?; // rbx = bad pages
        a.mov(qword_ptr(r15 + VB_VERIFY_PAGES), 0)?;
        a.set_label(&mut check_loop)?;
        a.cmp(rcx, rdi)?;
        a.jae(checked)?;
        a.mov(rsi, rcx)?;
        a.shl(rsi, 12)?;
        a.mov(rax, WS_VA)?;
        a.add(rsi, rax)?;
        a.mov(rax, JOURNAL_GPA)?;
        a.mov(rax, qword_ptr(rax + rcx * 8))?; // rax = journal
        a.test(rax, rax)?;
        a.jnz(written)?;
        a.mov(rdx, qword_ptr(rsi))?;
        a.or(rdx, qword_ptr(rsi + 16))?;
        a.or(rdx, qword_ptr(rsi + (PAGE_SIZE - 8)))?;
        a.jnz(bad)?;
        a.jmp(next)?;
        a.set_label(&mut written)?;
        a.cmp(qword_ptr(rsi + 16), rax)?;
        a.jne(bad)?;
        a.cmp(qword_ptr(rsi + (PAGE_SIZE - 8)), rax)?;
        a.jne(bad)?;
        a.mov(rdx, STAMP_MAGIC)?;
        a.or(rdx, rcx)?;
        a.cmp(qword_ptr(rsi), rdx)?;
        a.jne(bad)?;
        a.xor(rdx, qword_ptr(rsi + 8))?;
        a.xor(rdx, rax)?;
        a.mov(rax, CHECKSUM_K)?;
        a.imul_2(rdx, rax)?;
        a.cmp(qword_ptr(rsi + 24), rdx)?;
        a.jne(bad)?;
        a.jmp(next)?;
        a.set_label(&mut bad)?;
        a.inc(rbx)?;
        a.mov(eax, ecx)?;
        a.mov(dx, u32::from(PORT_BAD_PAGE))?;
        a.out(dx, eax)?;
        a.set_label(&mut next)?;
        a.inc(qword_ptr(r15 + VB_VERIFY_PAGES))?;
        a.inc(rcx)?;
        a.jmp(check_loop)?;
        a.set_label(&mut checked)?;
        a.mov(rax, qword_ptr(r15 + VB_VERIFY_PAGES))?;
        a.add(qword_ptr(r15 + VB_VERIFY_CHECKED), rax)?;
        a.add(qword_ptr(r15 + VB_VERIFY_BAD), rbx)?;
        self.barrier(&mut a, CTL_BARRIER_B)?;
        // Report only once past the second barrier: when the VMM has every report, no vCPU is
        // still inside this verify, so the next one cannot catch a vCPU half way.
        a.mov(rax, qword_ptr(r15 + VB_VERIFY_PAGES))?;
        a.mov(dx, u32::from(PORT_VERIFY_DONE))?;
        a.out(dx, eax)?;
        a.mov(rbx, qword_ptr(r15 + VB_SEQ_START))?; // sequential writers start their slice again
        a.mov(rbp, qword_ptr(r15 + VB_HOT_PAGES))?;
        a.jmp(write_loop)?;

        a.assemble(CODE_GPA)
    }

    /// vCPU 0 runs the port script the VMM posted, if there is a new one (see
    /// `protocol`'s module doc). It uses only the registers the doorbells use (rax, rcx, rdx,
    /// rsi, rdi), which the write loop does not keep across a batch boundary.
    fn port_script(&self, a: &mut CodeAssembler) -> std::result::Result<(), IcedError> {
        let mut done = a.create_label();
        let mut next_op = a.create_label();
        let mut op_in = a.create_label();
        let mut op_end = a.create_label();
        let mut ran = a.create_label();
        let max_ops = i32::try_from(MAX_PORT_OPS).expect("a script holds few operations");
        a.test(r8, r8)?;
        a.jnz(done)?;
        a.mov(rcx, CONTROL_GPA)?;
        a.mov(rax, qword_ptr(rcx + CTL_SCRIPT_SEQ))?;
        a.cmp(rax, qword_ptr(rcx + CTL_SCRIPT_DONE))?;
        a.je(done)?;
        a.mov(rdi, qword_ptr(rcx + CTL_SCRIPT_COUNT))?;
        // Never past the operations' words, whatever the count says.
        a.mov(eax, max_ops)?;
        a.cmp(rdi, rax)?;
        a.cmova(rdi, rax)?;
        a.lea(rsi, qword_ptr(rcx + CTL_SCRIPT_OPS))?;
        a.set_label(&mut next_op)?;
        a.test(rdi, rdi)?;
        a.jz(ran)?;
        a.movzx(edx, word_ptr(rsi))?;
        a.cmp(byte_ptr(rsi + 2), i32::from(SCRIPT_OUT))?;
        a.jne(op_in)?;
        a.mov(al, byte_ptr(rsi + SCRIPT_VALUE_BYTE))?;
        a.out(dx, al)?;
        a.jmp(op_end)?;
        a.set_label(&mut op_in)?;
        a.in_(al, dx)?;
        a.mov(byte_ptr(rsi + SCRIPT_READ_BYTE), al)?;
        a.set_label(&mut op_end)?;
        a.add(rsi, 8)?;
        a.dec(rdi)?;
        a.jmp(next_op)?;
        a.set_label(&mut ran)?;
        // Done with the sequence that was posted: the VMM posts no other until it sees this.
        a.mov(rax, qword_ptr(rcx + CTL_SCRIPT_SEQ))?;
        a.mov(qword_ptr(rcx + CTL_SCRIPT_DONE), rax)?;
        a.set_label(&mut done)?;
        Ok(())
    }

    /// All vCPUs increment the counter, then spin (yielding to the VMM) until it reaches the
    /// target in rbp.
    fn barrier(&self, a: &mut CodeAssembler, counter: u64) -> std::result::Result<(), IcedError> {
        let mut spin = a.create_label();
        let mut done = a.create_label();
        a.mov(rcx, CONTROL_GPA)?;
        a.lock().inc(qword_ptr(rcx + counter))?;
        a.set_label(&mut spin)?;
        a.cmp(qword_ptr(rcx + counter), rbp)?;
        a.jae(done)?;
        a.mov(dx, u32::from(PORT_YIELD))?;
        a.out(dx, eax)?;
        a.pause()?;
        a.jmp(spin)?;
        a.set_label(&mut done)?;
        Ok(())
    }
}
