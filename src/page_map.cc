#include "deferfs/page_map.h"

namespace deferfs {

uint64_t PageMap::hash(uint64_t page) {
  // splitmix64 finalizer: sequential pages spread over the table.
  uint64_t x = page + 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

size_t PageMap::probe(uint64_t page) const {
  size_t mask = capacity_ - 1;
  size_t i = hash(page) & mask;
  while (slots_[i].page != kEmpty && slots_[i].page != page) i = (i + 1) & mask;
  return i;
}

const PageEntry* PageMap::find(uint64_t page) const {
  if (used_ == 0) return nullptr;
  const Slot& s = slots_[probe(page)];
  return s.page == page ? &s.e : nullptr;
}

PageEntry* PageMap::find(uint64_t page) {
  return const_cast<PageEntry*>(static_cast<const PageMap*>(this)->find(page));
}

PageState PageMap::state(uint64_t page) const {
  const PageEntry* e = find(page);
  return e ? e->state : PageState::Absent;
}

void PageMap::grow() { rehash(capacity_ ? capacity_ * 2 : 64); }

void PageMap::rehash(size_t new_cap) {
  std::unique_ptr<Slot[]> old = std::move(slots_);
  size_t old_cap = capacity_;
  slots_ = std::make_unique<Slot[]>(new_cap);
  for (size_t i = 0; i < new_cap; ++i) slots_[i].page = kEmpty;
  capacity_ = new_cap;
  for (size_t i = 0; i < old_cap; ++i)
    if (old[i].page != kEmpty) slots_[probe(old[i].page)] = old[i];
}

void PageMap::erase_slot(size_t i) {
  // Backward-shift deletion: move later members of the probe run into the
  // gap so lookups never need tombstones.
  size_t mask = capacity_ - 1;
  size_t gap = i;
  for (size_t j = (i + 1) & mask; slots_[j].page != kEmpty; j = (j + 1) & mask) {
    size_t home = hash(slots_[j].page) & mask;
    // Can slot j move to the gap? Only if its home is not in (gap, j].
    bool home_in_between = gap <= j ? (home > gap && home <= j) : (home > gap || home <= j);
    if (!home_in_between) {
      slots_[gap] = slots_[j];
      gap = j;
    }
  }
  slots_[gap].page = kEmpty;
  slots_[gap].e = PageEntry{};
  --used_;
  // Shrink when at most 1/8 full, to the smallest table at most half full:
  // the 1% bound holds on the way down too, and the next shrink needs the
  // entries to quarter again (amortized O(1), no thrashing).
  if (used_ == 0) {
    clear();
  } else if (capacity_ > 64 && used_ * 8 <= capacity_) {
    size_t cap = 64;
    while (cap < used_ * 2) cap *= 2;
    rehash(cap);
  }
}

PageEntry* PageMap::set_state(uint64_t page, PageState to) {
  PageState from;
  return set_state(page, to, from);
}

PageEntry* PageMap::set_state(uint64_t page, PageState to, PageState& from) {
  size_t i = capacity_ ? probe(page) : 0;
  bool present = capacity_ && slots_[i].page == page;
  from = present ? slots_[i].e.state : PageState::Absent;
  check_transition(from, to);
  if (from == to) return present ? &slots_[i].e : nullptr;
  if (present) --counts_[static_cast<int>(from)];
  if (to == PageState::Absent) {
    erase_slot(i);
    return nullptr;
  }
  ++counts_[static_cast<int>(to)];
  if (!present) {
    // Keep the load at or below 7/8 (see the header for the memory bound).
    if ((used_ + 1) * 8 > capacity_ * 7) {
      grow();
    }
    i = probe(page);
    slots_[i].page = page;
    slots_[i].e = PageEntry{};
    ++used_;
  }
  if (from == PageState::Spilled) slots_[i].e.flags &= static_cast<uint8_t>(~PageEntry::kCommitting);
  if (from == PageState::Loading) slots_[i].e.flags &= static_cast<uint8_t>(~PageEntry::kFromSpill);
  slots_[i].e.state = to;
  return &slots_[i].e;
}

void PageMap::clear() {
  slots_.reset();
  capacity_ = 0;
  used_ = 0;
  for (auto& c : counts_) c = 0;
}

}  // namespace deferfs
