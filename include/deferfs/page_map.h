// Sparse map page index -> page entry for one file.
//
// Why a hash table and not a radix of fixed leaves (wendelin's pagemap): spec
// 7.1 caps bookkeeping at 1% of materialized bytes, and random 4 KiB touches
// would each allocate a whole leaf. An open-addressing table (linear probing,
// backward-shift deletion, no tombstones) costs 16 bytes per slot and stays
// between 7/16 and 7/8 full, so at most ~37 bytes per resident 4 KiB page
// (0.9%); it shrinks again when 1/8 full; nothing is allocated for untouched
// ranges; lookup is O(1).
// Offset-ordered walks (sync, truncate) sort the pages they collect.
//
// Not thread-safe: the owning File guards it with its mutex. Entry pointers
// are invalidated by any set_state() (entries move); never keep one across it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "deferfs/page_state.h"

namespace deferfs {

struct PageEntry {
  // Bits of `flags`.
  static constexpr uint8_t kReferenced = 1;   // touched since the clock hand last passed (eviction)
  static constexpr uint8_t kFromSpill = 2;    // Loading: the bytes come from the spill file
  static constexpr uint8_t kSpilling = 4;     // Dirty: being copied to the spill file; a write clears it
  static constexpr uint8_t kCommitting = 8;   // Spilled: a sync is committing it; leaving Spilled clears it
  // Dirty/Writeback: the page's bytes are known to differ from the base's
  // (their hash differs from base_hash, or a byte compare said so) since
  // they last changed. Set only where that is seen (File::write,
  // settle_candidates); cleared by every change of state but Dirty ->
  // Writeback, and wherever bytes change unseen. A sync journals such a page
  // without reading the source to compare it.
  static constexpr uint8_t kDiffers = 16;

  PageState state = PageState::Absent;
  // True when base_hash holds the low 32 bits of xxh3-64 of the snapshot's
  // bytes of this page (a hint: equality is always confirmed byte for byte).
  bool has_base_hash = false;
  uint8_t flags = 0;
  uint8_t reserved = 0;
  uint32_t base_hash = 0;
};
static_assert(sizeof(PageEntry) == 8, "page entries must stay small (spec 7.1)");

class PageMap {
 public:
  PageMap() = default;
  PageMap(const PageMap&) = delete;
  PageMap& operator=(const PageMap&) = delete;

  // The entry of `page`, or nullptr if the page is Absent.
  PageEntry* find(uint64_t page);
  const PageEntry* find(uint64_t page) const;
  PageState state(uint64_t page) const;

  // Moves `page` to state `to` (checked against the allowed transitions),
  // creating its entry or removing it when it becomes Absent (hash fields are
  // kept across non-Absent transitions). Returns the entry, nullptr when `to`
  // is Absent. Keeps the per-state counts. The second form also says what
  // the state was (one lookup for both: a cold read makes several
  // transitions of every page).
  PageEntry* set_state(uint64_t page, PageState to);
  PageEntry* set_state(uint64_t page, PageState to, PageState& from);

  // Pages (sorted ascending) with first <= page < last whose entry satisfies
  // pred(const PageEntry&).
  template <typename Pred>
  std::vector<uint64_t> collect(uint64_t first, uint64_t last, Pred&& pred) const;

  // The eviction clock: visits up to `max_slots` slots from `hand` (advanced,
  // wrapping), calling f(page, PageEntry&) on each entry; f may change flags,
  // not the state. Returns the number of slots visited.
  template <typename F>
  size_t sweep(size_t& hand, size_t max_slots, F&& f);
  size_t capacity() const { return capacity_; }

  // Number of pages in each state (Absent is not counted).
  uint64_t count(PageState s) const { return counts_[static_cast<int>(s)]; }
  uint64_t entries() const { return used_; }
  // Bytes this map allocates.
  uint64_t memory_bytes() const { return capacity_ * sizeof(Slot); }
  void clear();

 private:
  struct Slot {
    uint64_t page;  // kEmpty when free
    PageEntry e;
  };
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  static uint64_t hash(uint64_t page);
  // Index of `page`'s slot, or of the free slot where it would go.
  size_t probe(uint64_t page) const;
  void grow();
  void rehash(size_t new_cap);
  void erase_slot(size_t i);

  std::unique_ptr<Slot[]> slots_;
  size_t capacity_ = 0;  // power of two, or 0
  size_t used_ = 0;
  uint64_t counts_[kPageStateCount] = {};
};

template <typename F>
size_t PageMap::sweep(size_t& hand, size_t max_slots, F&& f) {
  if (capacity_ == 0) return 0;
  size_t n = std::min(max_slots, capacity_);
  for (size_t k = 0; k < n; ++k) {
    hand &= capacity_ - 1;
    Slot& s = slots_[hand++];
    if (s.page != kEmpty) f(s.page, s.e);
  }
  return n;
}

template <typename Pred>
std::vector<uint64_t> PageMap::collect(uint64_t first, uint64_t last, Pred&& pred) const {
  std::vector<uint64_t> out;
  for (size_t i = 0; i < capacity_; ++i) {
    const Slot& s = slots_[i];
    if (s.page != kEmpty && s.page >= first && s.page < last && pred(s.e)) out.push_back(s.page);
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace deferfs
