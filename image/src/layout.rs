//! The appliance disk's partition layout, as arithmetic only: where each partition starts and
//! how big the image is. No I/O, so the layout `build` writes and the one `install` expects
//! are the same function of the same sizes.

use serde::{Deserialize, Serialize};

pub const MIB: u64 = 1 << 20;
/// Logical sector size the GPT is written for; every target we flash uses 512-byte LBAs.
pub const SECTOR: u64 = 512;
/// Partitions start on MiB boundaries: aligned for every flash erase block and 4K sector.
pub const ALIGN: u64 = MIB;

/// A partition's job in the A/B layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// EFI system partition: GRUB, its A/B script and its environment block.
    Esp,
    RootA,
    RootB,
    /// Persistent depot data, kept across updates of the root slots.
    Data,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Esp, Role::RootA, Role::RootB, Role::Data];

    /// GPT partition name (also the file system label), what `/dev/disk/by-partlabel/` shows.
    pub fn name(self) -> &'static str {
        match self {
            Role::Esp => "esp",
            Role::RootA => "root_a",
            Role::RootB => "root_b",
            Role::Data => "data",
        }
    }

    /// GPT partition type GUID (UEFI ESP; Discoverable Partitions' x86-64 root; Linux data).
    pub fn type_guid(self) -> &'static str {
        match self {
            Role::Esp => "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
            Role::RootA | Role::RootB => "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
            Role::Data => "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
        }
    }

    pub fn filesystem(self) -> &'static str {
        match self {
            Role::Esp => "vfat",
            _ => "ext4",
        }
    }
}

/// Requested partition sizes in bytes; each is rounded up to whole MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub esp: u64,
    /// Each root slot; A and B are always equal so either can hold any update.
    pub root: u64,
    pub data: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub role: Role,
    /// Byte offset in the image.
    pub offset: u64,
    pub size: u64,
}

impl Placed {
    pub fn end(&self) -> u64 {
        self.offset + self.size
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Total image size, including the backup GPT at the end.
    pub size: u64,
    pub partitions: Vec<Placed>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("the {0} partition needs at least {1} MiB")]
    TooSmall(&'static str, u64),
    #[error("partition sizes overflow")]
    Overflow,
}

/// The smallest sizes that make sense: FAT32 needs 32 MiB of clusters; ext4 with a journal
/// needs a few MiB, and a root file system much smaller than 16 MiB holds nothing useful.
const MIN_MIB: [(Role, u64); 4] = [
    (Role::Esp, 33),
    (Role::RootA, 16),
    (Role::RootB, 16),
    (Role::Data, 8),
];

impl Layout {
    pub fn plan(sizes: Sizes) -> Result<Self, LayoutError> {
        let mut offset = ALIGN; // the first MiB holds the protective MBR and the primary GPT
        let mut partitions = Vec::with_capacity(4);
        for (role, min_mib) in MIN_MIB {
            let requested = match role {
                Role::Esp => sizes.esp,
                Role::RootA | Role::RootB => sizes.root,
                Role::Data => sizes.data,
            };
            let size = round_up(requested, ALIGN).ok_or(LayoutError::Overflow)?;
            if size < min_mib * MIB {
                return Err(LayoutError::TooSmall(role.name(), min_mib));
            }
            partitions.push(Placed { role, offset, size });
            offset = offset.checked_add(size).ok_or(LayoutError::Overflow)?;
        }
        // The backup GPT takes the last 33 sectors; a whole MiB keeps the size aligned.
        let size = offset.checked_add(ALIGN).ok_or(LayoutError::Overflow)?;
        Ok(Self { size, partitions })
    }

    pub fn get(&self, role: Role) -> &Placed {
        self.partitions
            .iter()
            .find(|p| p.role == role)
            .expect("a planned layout has every role")
    }
}

pub fn round_up(value: u64, to: u64) -> Option<u64> {
    value.checked_add(to - 1).map(|v| v / to * to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_aligned_contiguous_and_roots_equal() {
        let layout = Layout::plan(Sizes {
            esp: 64 * MIB,
            root: 300 * MIB + 1,
            data: 100 * MIB,
        })
        .unwrap();
        let names: Vec<_> = layout.partitions.iter().map(|p| p.role.name()).collect();
        assert_eq!(names, ["esp", "root_a", "root_b", "data"]);
        assert_eq!(layout.get(Role::RootA).size, 301 * MIB);
        assert_eq!(layout.get(Role::RootA).size, layout.get(Role::RootB).size);
        let mut expected_offset = MIB;
        for p in &layout.partitions {
            assert_eq!(p.offset % ALIGN, 0);
            assert_eq!(p.offset, expected_offset);
            expected_offset = p.end();
        }
        assert_eq!(layout.size, layout.get(Role::Data).end() + MIB);
    }

    #[test]
    fn refuses_partitions_too_small_to_hold_their_file_system() {
        let err = Layout::plan(Sizes {
            esp: 8 * MIB,
            root: 64 * MIB,
            data: 64 * MIB,
        })
        .unwrap_err();
        assert_eq!(err, LayoutError::TooSmall("esp", 33));
        assert_eq!(
            Layout::plan(Sizes {
                esp: 64 * MIB,
                root: u64::MAX - 10,
                data: 64 * MIB
            })
            .unwrap_err(),
            LayoutError::Overflow
        );
    }
}
