//! x86-64 4-level page tables for the guest, built in host memory and then copied in, with
//! 2 MiB pages wherever both addresses are aligned.

use super::layout::HUGE_PAGE;
use crate::error::{KvmError, Result};
use crate::memory::PAGE_SIZE;

/// x86-64 4-level page tables built in host memory, then copied into the guest.
pub(super) struct PageTables {
    base: u64,
    capacity: u64,
    pages: Vec<[u64; 512]>,
}

const PTE_PRESENT_RW: u64 = 0x3;
const PTE_HUGE: u64 = 0x80;

impl PageTables {
    pub(super) fn new(base: u64, capacity: u64) -> Self {
        Self {
            base,
            capacity,
            pages: vec![[0; 512]],
        }
    }

    pub(super) fn pages(&self) -> impl Iterator<Item = (u64, &[u64; 512])> {
        self.pages
            .iter()
            .enumerate()
            .map(|(i, page)| (self.base + i as u64 * PAGE_SIZE, page))
    }

    /// The table that entry `index` of table `table` points to, created if absent.
    fn child(&mut self, table: usize, index: usize) -> Result<usize> {
        let entry = self.pages[table][index];
        if entry & 1 != 0 {
            let index = ((entry & !0xfff) - self.base) / PAGE_SIZE;
            return Ok(usize::try_from(index).expect("a table this builder made is in `pages`"));
        }
        if self.pages.len() as u64 >= self.capacity {
            return Err(KvmError::Invalid(
                "guest page tables do not fit their area".into(),
            ));
        }
        self.pages.push([0; 512]);
        let child = self.pages.len() - 1;
        self.pages[table][index] = (self.base + child as u64 * PAGE_SIZE) | PTE_PRESENT_RW;
        Ok(child)
    }

    /// Maps `[va, va + len)` to `[pa, pa + len)` with 2 MiB pages where both are aligned.
    pub(super) fn map(&mut self, mut va: u64, mut pa: u64, len: u64) -> Result<()> {
        let end = va + len;
        while va < end {
            let pdpt = self.child(0, (va >> 39) as usize & 511)?;
            let pd = self.child(pdpt, (va >> 30) as usize & 511)?;
            let pd_index = (va >> 21) as usize & 511;
            if va.is_multiple_of(HUGE_PAGE) && pa.is_multiple_of(HUGE_PAGE) && end - va >= HUGE_PAGE
            {
                self.pages[pd][pd_index] = pa | PTE_PRESENT_RW | PTE_HUGE;
                va += HUGE_PAGE;
                pa += HUGE_PAGE;
            } else {
                let pt = self.child(pd, pd_index)?;
                self.pages[pt][(va >> 12) as usize & 511] = pa | PTE_PRESENT_RW;
                va += PAGE_SIZE;
                pa += PAGE_SIZE;
            }
        }
        Ok(())
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::layout::WS_VA;
    use crate::guest::{GuestLayout, GuestProgram, Workload};

    #[test]
    fn page_tables_use_huge_pages_where_aligned() {
        let layout = GuestLayout::new(64 << 30, &Workload::default()).unwrap();
        let program = GuestProgram::new(&layout, &Workload::default(), 1).unwrap();
        let mut tables = PageTables::new(layout.page_tables_gpa, layout.page_tables_pages);
        tables.map(0, 0, layout.memory.slots[0].size).unwrap();
        let mut va = WS_VA;
        for slot in layout.memory.data_slots() {
            tables.map(va, slot.gpa, slot.size).unwrap();
            va += slot.size;
        }
        assert!(
            tables.pages.len() < 100,
            "{} table pages",
            tables.pages.len()
        );
        assert!(program.assemble().unwrap().len() < 2048);
    }
}
