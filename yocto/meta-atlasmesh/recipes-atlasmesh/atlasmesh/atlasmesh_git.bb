# nooelint: oelint.var.bbclassextend oelint.var.mandatoryvar.HOMEPAGE oelint.var.suggestedvar.BUGTRACKER
# Suppressed above: the depot binary is built for the target only (no native or nativesdk
# variant), and the project has no public homepage or bug tracker.
SUMMARY = "AtlasMesh depot: the atlasmesh binary, its service and configuration"
DESCRIPTION = "The depot appliance of AtlasMesh: panel and API, vehicle link, OTA staging, \
               charging and disk health, run as the atlasmesh-depot systemd service."
SECTION = "net"

LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

PV = "0.1.0+git"

# The repository is not published at a fetchable address: local builds use externalsrc
# (yocto/kas/atlasmesh.yml does), release builds set the real SRC_URI and SRCREV (README.md).
SRC_URI = "git://example.invalid/atlasmesh.git;protocol=https;branch=main \
           file://atlasmesh-depot.service \
           file://depot.toml \
           "
SRCREV = "0000000000000000000000000000000000000000"

require ${BPN}-crates.inc

CVE_PRODUCT = "atlasmesh"

inherit cargo cargo-update-recipe-crates systemd

# The Cargo workspace is the repository; the binary is package atlasmesh-appliance, whose
# only binary target is atlasmesh. Cargo.lock is the workspace's, at the root.
CARGO_SRC_DIR = "appliance"
CARGO_LOCK_PATH = "${S}/Cargo.lock"

do_install() {
    install -D -m 0755 ${B}/target/${CARGO_TARGET_SUBDIR}/atlasmesh ${D}${bindir}/atlasmesh
    install -D -m 0644 ${UNPACKDIR}/atlasmesh-depot.service ${D}${systemd_system_unitdir}/atlasmesh-depot.service
    install -D -m 0644 ${UNPACKDIR}/depot.toml ${D}${sysconfdir}/atlasmesh/depot.toml
}

SYSTEMD_SERVICE:${PN} = "atlasmesh-depot.service"

CONFFILES:${PN} = "${sysconfdir}/atlasmesh/depot.toml"

# smartctl for disk health; grub-editenv and mke2fs for `atlasmesh image install` and
# `mark-good` (writing the inactive root slot and GRUB's environment block).
RDEPENDS:${PN} = "e2fsprogs-mke2fs grub-editenv smartmontools"
