//! Natural (numeric-aware) order of names: `layers.2` before `layers.10`, `blocks_9` before
//! `blocks_10`. Module and layer names carry indices, and text order put layer 10 between 1 and
//! 2 in every table a person reads. Runs of ASCII digits compare by value (then by length, so
//! `007` and `7` still differ), everything else byte by byte.

use std::cmp::Ordering;

/// Compare two names naturally.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    loop {
        match (x.first(), y.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(p), Some(q)) if p.is_ascii_digit() && q.is_ascii_digit() => {
                let (dx, dy) = (digits(x), digits(y));
                let (nx, ny) = (&x[..dx], &y[..dy]);
                // Without leading zeros, a longer run is a larger number.
                let (tx, ty) = (trim_zeros(nx), trim_zeros(ny));
                let by_value = tx.len().cmp(&ty.len()).then_with(|| tx.cmp(ty)).then_with(|| dx.cmp(&dy));
                if by_value != Ordering::Equal {
                    return by_value;
                }
                x = &x[dx..];
                y = &y[dy..];
            }
            (Some(p), Some(q)) => {
                if p != q {
                    return p.cmp(q);
                }
                x = &x[1..];
                y = &y[1..];
            }
        }
    }
}

fn digits(s: &[u8]) -> usize {
    s.iter().take_while(|c| c.is_ascii_digit()).count()
}

fn trim_zeros(s: &[u8]) -> &[u8] {
    let z = s.iter().take_while(|&&c| c == b'0').count();
    &s[z.min(s.len().saturating_sub(1))..]
}

#[cfg(test)]
mod tests {
    use super::natural_cmp;
    use std::cmp::Ordering::*;

    #[test]
    fn numbers_compare_by_value() {
        assert_eq!(natural_cmp("model.layers.2.mlp", "model.layers.10.mlp"), Less);
        assert_eq!(natural_cmp("input_blocks_10_1", "input_blocks_9_1"), Greater);
        assert_eq!(natural_cmp("a7", "a007"), Less);
        assert_eq!(natural_cmp("a", "a1"), Less);
        assert_eq!(natural_cmp("x.q_proj", "x.k_proj"), Greater);
        let mut v = vec!["l.10", "l.2", "l.1", "l.20", "l.3"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["l.1", "l.2", "l.3", "l.10", "l.20"]);
    }
}
