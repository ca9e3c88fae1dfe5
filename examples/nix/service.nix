# One service: a binary built against the shared closure (deps.nix). Only this derivation is
# new in a build job; everything it needs is already valid on the /nix disk (or substituted).
#
#   nix-build service.nix --argstr service gateway --argstr port 8080
{ service, port, kernels ? "6" }:
derivation {
  name = "service-${service}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ ./build-service.sh ];
  inherit service port;
  sdk = import ./deps.nix { inherit kernels; };
  main = ./service.c;
  PATH = "/usr/bin:/bin";
}
