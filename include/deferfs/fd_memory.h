// Memory that is a mapping of a file, registered so that a copy out of it
// can be made by the kernel (pread of the file) rather than by the CPU in
// user mode.
//
// Why: on this machine kind (a PVM guest, shadow paging) the first user-mode
// touch of a page costs a fault of the hypervisor's, about 6.5 us per 4 KiB
// page (1 MiB copied out of pages just written through the memfd: 0.6 GB/s
// by memcpy, 11.8 GB/s by pread; micro_bench BM_CopyFreshPages). The
// kernel reaches the same pages through its own mapping.
//
// Segments register their mappings; the io_uring transport copies replies
// through copy_out(). Neither knows the other.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>

namespace deferfs::fd_memory {

// [addr, addr+len) maps `fd` from offset 0. The caller keeps fd open and
// the mapping in place until remove(addr), and removes it before either
// ends. Any thread.
void add(const void* addr, size_t len, int fd);
void remove(const void* addr);

// Copies [from, from+len) to `to` with pread when it lies in one
// registered mapping: `len` copied, or -errno (EIO: the file is shorter than
// the mapping there, where a load through the mapping would raise SIGBUS).
// 0 when it is not registered memory (the caller copies it itself).
ssize_t copy_out(void* to, const void* from, size_t len);

}  // namespace deferfs::fd_memory
