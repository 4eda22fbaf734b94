"""pdserve's public API as Python stubs generated from proto/ (scripts/gen_proto.sh), one subpackage per
version. Imported downward by the router (server side) and the CLI, bench and demo (client side)."""
