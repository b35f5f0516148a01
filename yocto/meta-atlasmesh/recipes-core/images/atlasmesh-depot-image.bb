# nooelint: oelint.var.suggestedvar.BUGTRACKER oelint.var.suggestedvar.CVE_PRODUCT oelint.var.suggestedvar.SECTION
# Suppressed above: an image recipe has no bug tracker, CVE identity or package section.
SUMMARY = "AtlasMesh depot appliance image"
DESCRIPTION = "A GPT disk image with the A/B layout of atlasmesh image build: an EFI system \
               partition with GRUB choosing between root slots root_a and root_b, both \
               holding this root file system, and a data partition for the depot's store."
LICENSE = "MIT"

inherit core-image features_check

REQUIRED_DISTRO_FEATURES = "systemd"
REQUIRED_MACHINE_FEATURES = "efi"

# kernel-image: the kernel lives in each root slot (/boot/bzImage); GRUB boots it from the
# slot it picked, so a slot update carries its own kernel.
IMAGE_INSTALL += "atlasmesh e2fsprogs-mke2fs grub-editenv kernel-image smartmontools"

IMAGE_FSTYPES = "wic wic.bmap"
WKS_FILE = "atlasmesh-ab.wks"

# The factory GRUB environment block, next to grub.cfg on the ESP. (Both variables are
# OE-core's, from the wic image type and its bootimg_efi plugin; oelint-adv does not know them.)
# nooelint: oelint.vars.mispell
IMAGE_EFI_BOOT_FILES += "atlasmesh-grubenv;EFI/BOOT/grubenv"
# nooelint: oelint.vars.mispell.unknown
do_image_wic[depends] += "atlasmesh-grubenv:do_deploy"
