# kvbits for CMake hosts, installed by scripts/install-ffi.sh as
# PREFIX/lib/cmake/kvbits/kvbits-config.cmake. With PREFIX in CMAKE_PREFIX_PATH:
#
#   find_package(kvbits REQUIRED)
#   target_link_libraries(app PRIVATE kvbits::kvbits)          # the static library
#   target_link_libraries(app PRIVATE kvbits::kvbits_shared)   # or the shared one
#
# Both carry the include directory (kvbits.h, kvbits.hpp).

get_filename_component(_kvbits_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
set(kvbits_INCLUDE_DIR "${_kvbits_prefix}/include")

if(NOT EXISTS "${kvbits_INCLUDE_DIR}/kvbits.h")
  set(kvbits_FOUND FALSE)
  set(kvbits_NOT_FOUND_MESSAGE "kvbits.h is not in ${kvbits_INCLUDE_DIR}: run scripts/install-ffi.sh PREFIX")
  return()
endif()

if(NOT TARGET kvbits::kvbits)
  include(CMakeFindDependencyMacro)
  find_dependency(Threads)
  # What Rust's standard library needs from the system (rustc --print native-static-libs).
  set(_kvbits_system_libs Threads::Threads ${CMAKE_DL_LIBS})
  if(APPLE)
    set(_kvbits_shared "${_kvbits_prefix}/lib/libkvbits.dylib")
  else()
    list(APPEND _kvbits_system_libs m rt util)
    set(_kvbits_shared "${_kvbits_prefix}/lib/libkvbits.so")
  endif()

  add_library(kvbits::kvbits STATIC IMPORTED)
  set_target_properties(kvbits::kvbits PROPERTIES
    IMPORTED_LOCATION "${_kvbits_prefix}/lib/libkvbits.a"
    INTERFACE_INCLUDE_DIRECTORIES "${kvbits_INCLUDE_DIR}"
    INTERFACE_LINK_LIBRARIES "${_kvbits_system_libs}")

  add_library(kvbits::kvbits_shared SHARED IMPORTED)
  set_target_properties(kvbits::kvbits_shared PROPERTIES
    IMPORTED_LOCATION "${_kvbits_shared}"
    # Rust's cdylib has no SONAME: hosts record the library's path.
    IMPORTED_NO_SONAME TRUE
    INTERFACE_INCLUDE_DIRECTORIES "${kvbits_INCLUDE_DIR}")
endif()
set(kvbits_FOUND TRUE)
