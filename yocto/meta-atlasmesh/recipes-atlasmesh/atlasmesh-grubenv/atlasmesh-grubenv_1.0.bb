# nooelint: oelint.var.bbclassextend oelint.var.mandatoryvar.HOMEPAGE oelint.var.mandatoryvar.SRC_URI oelint.var.suggestedvar.BUGTRACKER oelint.var.suggestedvar.CVE_PRODUCT
# Suppressed above: this recipe only deploys a data file for the image, made by grub-editenv
# at build time: no sources, no native variant, no homepage, bug tracker or CVE identity.
SUMMARY = "Factory GRUB environment block for the AtlasMesh A/B root slots"
DESCRIPTION = "The grubenv the depot image ships on its EFI system partition: both slots \
               hold the factory root file system and are good, slot A first; the state \
               atlasmesh image build writes."
SECTION = "bootloaders"

LICENSE = "Apache-2.0"
# nooelint: oelint.var.licenseremotefile
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

DEPENDS = "grub-native"

S = "${UNPACKDIR}"

inherit deploy nopackages

# Deployed for one machine's image (the image's wic step picks it up).
PACKAGE_ARCH = "${MACHINE_ARCH}"

do_compile() {
    rm -f ${B}/grubenv
    grub-editenv ${B}/grubenv create
    grub-editenv ${B}/grubenv set "ORDER=A B" A_OK=1 A_TRY=0 B_OK=1 B_TRY=0
}

do_deploy() {
    install -m 0644 ${B}/grubenv ${DEPLOYDIR}/atlasmesh-grubenv
}
addtask deploy after do_compile before do_build
