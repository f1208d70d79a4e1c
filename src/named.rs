//! Closed sets of names (module kinds, routes, verdicts, flags, input roles...): one table per
//! type gives the variant's name in JSON, on the terminal and in HTML alike, parses it back
//! (clap values, `--fail-on` lists, report.json), and lists every member.

/// Declare an enum whose variants each carry one name: `as_str`, `ALL`, `Display`, `FromStr`
/// and serde (as that string, so it also works as a JSON map key) all read the same table.
macro_rules! closed_set {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every member, in declaration order.
            #[allow(dead_code)]
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The member's one name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text ),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $( $text => Ok($name::$variant), )+
                    _ => Err(format!(
                        "unknown {} {:?} ({}s: {})",
                        $what,
                        s,
                        $what,
                        [$($text),+].join(", ")
                    )),
                }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

pub(crate) use closed_set;

#[cfg(test)]
mod tests {
    closed_set! {
        enum Colour ("colour") {
            Red = "red",
            DarkBlue = "dark-blue",
        }
    }

    #[test]
    fn one_table_for_every_use() {
        assert_eq!(Colour::DarkBlue.to_string(), "dark-blue");
        assert_eq!("red".parse::<Colour>(), Ok(Colour::Red));
        assert_eq!("blue".parse::<Colour>().unwrap_err(), "unknown colour \"blue\" (colours: red, dark-blue)");
        assert_eq!(serde_json::to_string(&Colour::DarkBlue).unwrap(), "\"dark-blue\"");
        let m: std::collections::BTreeMap<Colour, u8> = serde_json::from_str(r#"{"dark-blue": 2, "red": 1}"#).unwrap();
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"red":1,"dark-blue":2}"#);
        assert_eq!(Colour::ALL, &[Colour::Red, Colour::DarkBlue]);
    }
}
