# Fails the build where a kernel object built for an instruction set defines a weak symbol outside
# its own namespace (an inline function or a template member compiled with that set's
# instructions). The linker keeps one weak copy for all callers, so baseline code could run AVX2 or
# AVX-512 instructions on a CPU without them (csrc/cpu/aligned_vector.h has the case that did).
# Run by CMakeLists.txt before _C links: cmake -DNM=<nm> -DOBJECTS=<a.o|b.o|...> -P <this file>.
string(REPLACE "|" ";" objects "${OBJECTS}")
set(found "")
foreach(object IN LISTS objects)
  if(object STREQUAL "")
    continue()
  endif()
  execute_process(COMMAND "${NM}" --defined-only "${object}" OUTPUT_VARIABLE symbols RESULT_VARIABLE status)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "check_isa_objects: ${NM} could not read ${object}")
  endif()
  string(REPLACE "\n" ";" lines "${symbols}")
  foreach(line IN LISTS lines)
    # Mangled names: weak (W, V), unique (u); the kernels' own live in namespaces isa_<set>.
    if(line MATCHES "^[0-9a-fA-F]* [WVu] ([^ ]+)$")
      set(name "${CMAKE_MATCH_1}")
      if(NOT name MATCHES "[0-9]isa_[a-z0-9]+" AND NOT name MATCHES "^DW\\.ref\\.")
        string(APPEND found "\n  ${object}: ${name}")
      endif()
    endif()
  endforeach()
endforeach()
if(found)
  message(FATAL_ERROR "check_isa_objects: kernel objects define weak symbols outside their isa_* namespace; "
                      "give them one baseline copy (extern template, as csrc/cpu/aligned_vector.h does):${found}")
endif()
