# The shared dependency closure: five static C libraries, each calling the ones before it
# (core <- codec, hash <- net, store), and the sdk tree that links them all. No nixpkgs: the
# builders are the host's /bin/sh and gcc, seen through Nix's sandbox-paths.
#
#   nix-build deps.nix --argstr kernels 6     # 30 kernels of real -O2 work, ~20 s on 2 cores
{ kernels ? "6" }:
let
  system = builtins.currentSystem;
  lib = name: deps: derivation {
    name = "lib${name}";
    inherit system kernels deps;
    libname = name;
    builder = "/bin/sh";
    args = [ ./build-lib.sh ];
    kernel = ./kernel.c;
    PATH = "/usr/bin:/bin";
  };
  core = lib "core" [ ];
  codec = lib "codec" [ core ];
  hash = lib "hash" [ core ];
  net = lib "net" [ codec core ];
  store = lib "store" [ hash codec core ];
in
derivation {
  name = "example-sdk";
  inherit system;
  builder = "/bin/sh";
  args = [ ./build-sdk.sh ];
  libs = [ core codec hash net store ];
  PATH = "/usr/bin:/bin";
}
