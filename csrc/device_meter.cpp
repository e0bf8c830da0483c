#include "device_meter.h"

namespace dtr {

DeviceMeter::DeviceMeter(c10::Device device) : device_(device), allocator_(nullptr) {
  TORCH_CHECK(!device.is_cpu(), "dtr: the CPU's count is the counting allocator's (alloc_meter.h)");
  TORCH_CHECK(device.has_index(), "dtr: a device meter needs a device index, got ", device);
  auto* allocator = c10::GetAllocator(device.type());
  allocator_ = dynamic_cast<c10::DeviceAllocator*>(allocator);
  TORCH_CHECK(allocator_ != nullptr, "dtr: the allocator of ", device,
              " keeps no count of its bytes, so a budget cannot be checked against it; "
              "run the dtr block on CPU or CUDA");
}

int64_t DeviceMeter::allocated_bytes() const {
  const auto stats = allocator_->getDeviceStats(device_.index());
  return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].current;
}

}  // namespace dtr
