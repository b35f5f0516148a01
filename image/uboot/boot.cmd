# AtlasMesh depot: A/B root slot selection for boards that boot with U-Boot, the same scheme
# as image/grub/grub.cfg (RAUC's), kept in U-Boot's environment. The depot reads and writes it
# with libubootenv's fw_printenv/fw_setenv when its configuration says
# `image.bootloader = "uboot"` (and `image.fw_env_config` where the environment is).
#
#   ORDER        slots in order of preference, e.g. "B A" after installing into B;
#   A_OK, B_OK   1 once a boot of that slot passed the depot's self-test (`atlasmesh image
#                mark-good`);
#   A_TRY, B_TRY 1 when `atlasmesh image install` armed one trial boot of a new slot.
# A slot armed for a trial is booted once: its TRY flag is cleared and saved *before* booting,
# so a slot that hangs, panics or never marks itself good is skipped on the next boot and the
# previous good slot boots again.
#
# Build the script image with: mkimage -A arm64 -T script -C none -d boot.cmd boot.scr
# It expects what U-Boot's distro boot sets before running boot.scr (devtype, devnum,
# kernel_addr_r, fdt_addr_r or fdtcontroladdr) and root_a/root_b partition labels, as the
# appliance's GPT layout has.

# Defaults for an environment that lacks a variable: slot A is the factory slot.
test -n "${ORDER}" || setenv ORDER "A B"
test -n "${A_OK}" || setenv A_OK 1
test -n "${A_TRY}" || setenv A_TRY 0
test -n "${B_OK}" || setenv B_OK 0
test -n "${B_TRY}" || setenv B_TRY 0

slot=
for s in ${ORDER}; do
  if test -z "${slot}"; then
    if test "${s}" = "A"; then
      if test "${A_TRY}" = "1"; then
        # One trial only: consume it now, before the kernel can fail.
        setenv A_TRY 0
        saveenv
        slot=A
      elif test "${A_OK}" = "1"; then
        slot=A
      fi
    elif test "${s}" = "B"; then
      if test "${B_TRY}" = "1"; then
        setenv B_TRY 0
        saveenv
        slot=B
      elif test "${B_OK}" = "1"; then
        slot=B
      fi
    fi
  fi
done
# Nothing recorded as bootable (a damaged environment): the factory slot rather than no boot.
if test -z "${slot}"; then
  slot=A
fi
if test "${slot}" = "A"; then
  part=root_a
else
  part=root_b
fi

echo "AtlasMesh depot: booting slot ${slot} (${part})"
part number ${devtype} ${devnum} ${part} rootpart
load ${devtype} ${devnum}:${rootpart} ${kernel_addr_r} /boot/Image
setenv bootargs "root=PARTLABEL=${part} rootwait ro atlasmesh.slot=${slot} ${console}"
booti ${kernel_addr_r} - ${fdtcontroladdr}
