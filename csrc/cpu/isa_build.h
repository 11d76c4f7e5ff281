// Included by every source that CMakeLists.txt compiles once per instruction set
// (sk_isa_library): it must be built with -DSK_ISA_NS=<namespace>, and SK_ISA_NAME is that
// namespace's name without "isa_" (the name lowbit_isas() and decode_isa() report).
#pragma once

#ifndef SK_ISA_NS
#error "build with -DSK_ISA_NS=<namespace>"
#endif

#define SK_ISA_STR2(x) #x
#define SK_ISA_STR(x) SK_ISA_STR2(x)
#define SK_ISA_NAME (SK_ISA_STR(SK_ISA_NS) + 4)
