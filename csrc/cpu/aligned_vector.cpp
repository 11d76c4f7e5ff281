// The one copy of AlignedVector's out-of-line members, built for baseline x86-64 (see aligned_vector.h).
#include "cpu/aligned_vector.h"

template class std::vector<float, sk::CacheLineAllocator<float>>;
template class std::vector<int8_t, sk::CacheLineAllocator<int8_t>>;
template class std::vector<uint8_t, sk::CacheLineAllocator<uint8_t>>;
template class std::vector<uint16_t, sk::CacheLineAllocator<uint16_t>>;
template class std::vector<int32_t, sk::CacheLineAllocator<int32_t>>;
template class std::vector<uint32_t, sk::CacheLineAllocator<uint32_t>>;
