// The kernel's FUSE wire structures that the transport reads and writes
// itself, and the FUSE-over-io_uring ABI of protocol 7.42 (Linux 6.14+).
// libfuse 3.14 installs no fuse_kernel.h and knows protocol 7.38 only, so
// these are our own definitions of the kernel's uapi layout; the
// static_asserts pin every size the kernel checks.
#pragma once

#include <cstddef>
#include <cstdint>

namespace deferfs::fuse_abi {

constexpr uint32_t kOpInit = 26;              // FUSE_INIT
constexpr uint32_t kInitExt = 1u << 30;       // FUSE_INIT_EXT: flags2 is valid
constexpr uint32_t kMaxPages = 1u << 22;      // FUSE_MAX_PAGES: max_pages is valid
constexpr uint32_t kOverIoUring2 = 1u << 9;   // FUSE_OVER_IO_URING (bit 41), in flags2
constexpr uint64_t kIntReqBit = 1ull << 63;   // FUSE_INT_REQ_BIT of an INTERRUPT's unique
constexpr size_t kMinReadBuffer = 8192;       // FUSE_MIN_READ_BUFFER

struct InHeader {  // struct fuse_in_header
  uint32_t len;    // the whole request: this header, the op header, the payload
  uint32_t opcode;
  uint64_t unique;
  uint64_t nodeid;
  uint32_t uid, gid, pid;
  uint16_t total_extlen;
  uint16_t padding;
};
static_assert(sizeof(InHeader) == 40);

struct OutHeader {  // struct fuse_out_header
  uint32_t len;
  int32_t error;
  uint64_t unique;
};
static_assert(sizeof(OutHeader) == 16);

struct InitIn {  // struct fuse_init_in (7.36+)
  uint32_t major, minor, max_readahead, flags;
  uint32_t flags2;
  uint32_t unused[11];
};
static_assert(sizeof(InitIn) == 64);

struct InitOut {  // struct fuse_init_out (7.36+)
  uint32_t major, minor, max_readahead, flags;
  uint16_t max_background, congestion_threshold;
  uint32_t max_write, time_gran;
  uint16_t max_pages, map_alignment;
  uint32_t flags2;
  uint32_t unused[7];
};
static_assert(sizeof(InitOut) == 64);
static_assert(offsetof(InitOut, flags2) == 32);

// ---- FUSE over io_uring (include/uapi/linux/fuse.h, 7.42) ----

constexpr uint32_t kUringCmdRegister = 1;        // FUSE_IO_URING_CMD_REGISTER
constexpr uint32_t kUringCmdCommitAndFetch = 2;  // FUSE_IO_URING_CMD_COMMIT_AND_FETCH
constexpr size_t kUringInOutHeaderSize = 128;    // FUSE_URING_IN_OUT_HEADER_SZ
constexpr size_t kUringOpInOutSize = 128;        // FUSE_URING_OP_IN_OUT_SZ

struct UringEntInOut {  // struct fuse_uring_ent_in_out
  uint64_t flags;
  uint64_t commit_id;   // the request's unique, to be given back on commit
  uint32_t payload_sz;  // bytes used in the payload buffer (both directions)
  uint32_t padding;
  uint64_t reserved;
};
static_assert(sizeof(UringEntInOut) == 32);

struct UringReqHeader {  // struct fuse_uring_req_header: iov[0] of an entry
  char in_out[kUringInOutHeaderSize];  // InHeader of a request / OutHeader of its reply
  char op_in[kUringOpInOutSize];       // the opcode's own header (fuse_read_in, ...)
  UringEntInOut ring_ent_in_out;
};
static_assert(sizeof(UringReqHeader) == 288);

struct UringCmdReq {  // struct fuse_uring_cmd_req: in the SQE128's command area
  uint64_t flags;
  uint64_t commit_id;
  uint16_t qid;
  uint8_t padding[6];
};
static_assert(sizeof(UringCmdReq) == 24);

}  // namespace deferfs::fuse_abi
