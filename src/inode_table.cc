#include "deferfs/inode_table.h"

#include <fuse_lowlevel.h>
#include <unistd.h>

namespace deferfs {

Inode::~Inode() { close(fd); }

InodeTable::InodeTable(int root_fd) {
  struct stat st;
  if (fstat(root_fd, &st) < 0) st = {};
  root_ = std::make_shared<Inode>(root_fd, st);
  root_->nlookup = 1;
}

InodeTable::~InodeTable() {
  // Each Inode holds the table's reference to itself: give them up, and
  // let them (and their Files) go once the table's lock is released.
  std::vector<std::shared_ptr<Inode>> refs;
  MutexLock lk(m_);
  inodes_.clear_and_dispose([&refs](Inode* inode) { refs.push_back(std::move(inode->table_ref)); });
}

std::shared_ptr<Inode> InodeTable::unlink(Inode& inode) {
  inodes_.erase(inodes_.iterator_to(inode));
  return std::move(inode.table_ref);
}

Inode& InodeTable::get(uint64_t nodeid) {
  if (nodeid == FUSE_ROOT_ID) return *root_;
  return *reinterpret_cast<Inode*>(nodeid);
}

uint64_t InodeTable::nodeid(const Inode& inode) const {
  if (&inode == root_.get()) return FUSE_ROOT_ID;
  return reinterpret_cast<uint64_t>(&inode);
}

std::shared_ptr<Inode> InodeTable::lookup(int fd, const struct stat& st) {
  MutexLock lk(m_);
  if (st.st_dev == root_->dev && st.st_ino == root_->ino) {
    close(fd);
    ++root_->nlookup;
    return root_;
  }
  auto it = inodes_.find(std::make_pair(st.st_dev, st.st_ino));
  if (it != inodes_.end()) {
    close(fd);
    ++it->nlookup;
    return it->table_ref;
  }
  auto inode = std::make_shared<Inode>(fd, st);
  inode->nlookup = 1;
  inode->table_ref = inode;
  inodes_.insert(*inode);
  return inode;
}

bool InodeTable::removable(Inode& inode) {
  if (inode.nlookup.load() != 0) return false;
  MutexLock fl(inode.m);
  return !inode.file || (inode.file->handles.load() == 0 && !inode.file->has_staged_now());
}

void InodeTable::forget(uint64_t nodeid, uint64_t n) {
  if (nodeid == FUSE_ROOT_ID) return;
  std::shared_ptr<Inode> gone;
  {
    MutexLock lk(m_);
    Inode& inode = get(nodeid);
    inode.nlookup -= std::min<uint64_t>(n, inode.nlookup.load());
    if (!removable(inode)) return;
    if (inode.is_linked()) gone = unlink(inode);
  }
  released(std::move(gone));
}

void InodeTable::prune(const Inode& inode) {
  std::shared_ptr<Inode> gone;
  {
    MutexLock lk(m_);
    Inode& in = const_cast<Inode&>(inode);  // ours: it is in the table
    if (!in.is_linked() || !removable(in)) return;
    gone = unlink(in);
  }
  released(std::move(gone));
}

void InodeTable::released(std::shared_ptr<Inode> inode) {
  if (inode && release_hook_) release_hook_(*inode);
}

std::shared_ptr<Inode> InodeTable::find(dev_t dev, ino_t ino) {
  MutexLock lk(m_);
  auto it = inodes_.find(std::make_pair(dev, ino));
  return it == inodes_.end() ? nullptr : it->table_ref;
}

void InodeTable::named(Inode& inode, const Inode& parent, const std::string& name) {
  MutexLock lk(inode.m);
  inode.parent = {parent.dev, parent.ino};
  inode.name = name;
}

std::vector<std::shared_ptr<Inode>> InodeTable::with_files() {
  std::vector<std::shared_ptr<Inode>> out;
  MutexLock lk(m_);
  for (Inode& inode : inodes_) {
    MutexLock fl(inode.m);
    if (inode.file) out.push_back(inode.table_ref);
  }
  return out;
}

}  // namespace deferfs
