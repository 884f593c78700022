//! Money as an exact count of micro-dollars: sums and comparisons of many small accruals
//! (a cent's fraction per second of a cheap GPU) stay exact, which `f64` sums do not.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Sub};

/// An amount of US dollars, exact to the micro-dollar (1e-6 USD). Prices per hour are
/// `Usd` too. Serialized as a JSON number of dollars.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Usd(i64);

const MICROS: i64 = 1_000_000;

impl Usd {
    pub const ZERO: Usd = Usd(0);

    pub const fn from_micros(micros: i64) -> Usd {
        Usd(micros)
    }

    pub const fn from_cents(cents: i64) -> Usd {
        Usd(cents.saturating_mul(10_000))
    }

    /// Dollars as a user or an API writes them (`2.5`), rounded to the micro-dollar;
    /// not-a-number counts as zero and huge values saturate.
    pub fn from_dollars(dollars: f64) -> Usd {
        if dollars.is_nan() {
            return Usd::ZERO;
        }
        // `as` saturates at the i64 bounds.
        Usd((dollars * MICROS as f64).round() as i64)
    }

    pub const fn micros(self) -> i64 {
        self.0
    }

    /// For display and JSON only: never sum these.
    pub fn dollars(self) -> f64 {
        self.0 as f64 / MICROS as f64
    }

    /// What `self` per hour costs over `secs` seconds (none for negative spans), rounded
    /// to the micro-dollar.
    pub fn per_hour_over(self, secs: i64) -> Usd {
        let secs = i128::from(secs.max(0));
        let micros = (i128::from(self.0.max(0)) * secs + 1800) / 3600;
        Usd(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    pub fn max(self, other: Usd) -> Usd {
        Usd(self.0.max(other.0))
    }
}

impl Add for Usd {
    type Output = Usd;
    fn add(self, rhs: Usd) -> Usd {
        Usd(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for Usd {
    fn add_assign(&mut self, rhs: Usd) {
        *self = *self + rhs;
    }
}

impl Sub for Usd {
    type Output = Usd;
    fn sub(self, rhs: Usd) -> Usd {
        Usd(self.0.saturating_sub(rhs.0))
    }
}

impl Sum for Usd {
    fn sum<I: Iterator<Item = Usd>>(iter: I) -> Usd {
        iter.fold(Usd::ZERO, Add::add)
    }
}

impl<'a> Sum<&'a Usd> for Usd {
    fn sum<I: Iterator<Item = &'a Usd>>(iter: I) -> Usd {
        iter.copied().sum()
    }
}

/// `$12.34`: whole cents, rounded half away from zero.
impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cents = (i128::from(self.0) + if self.0 < 0 { -5_000 } else { 5_000 }) / 10_000;
        let sign = if cents < 0 { "-" } else { "" };
        let cents = cents.abs();
        write!(f, "{sign}${}.{:02}", cents / 100, cents % 100)
    }
}

impl Serialize for Usd {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.dollars())
    }
}

impl<'de> Deserialize<'de> for Usd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Usd, D::Error> {
        f64::deserialize(d).map(Usd::from_dollars)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_are_exact_and_display_in_cents() {
        // A thousand one-second accruals at $0.36/h are exactly ten cents.
        let price = Usd::from_dollars(0.36);
        let total: Usd = (0..1000).map(|_| price.per_hour_over(1)).sum();
        assert_eq!(total, Usd::from_cents(10));
        assert_eq!(total.to_string(), "$0.10");
        assert_eq!(
            Usd::from_dollars(2.5).per_hour_over(3600).to_string(),
            "$2.50"
        );
        assert_eq!(Usd::ZERO.to_string(), "$0.00");
        assert_eq!(Usd::from_micros(-4_999).to_string(), "$0.00");
        assert_eq!(Usd::from_dollars(-1.005).to_string(), "-$1.01");
        assert_eq!(Usd::from_dollars(1.0).per_hour_over(-5), Usd::ZERO);
        assert_eq!(Usd::from_dollars(f64::NAN), Usd::ZERO);
    }
}
