//! A money account: never overdrawn; every movement carries a transaction
//! id, and a transfer is recorded on both sides (sent on the source,
//! received on the target, refunded to the source if it cannot complete).
//! A movement repeated with the same transaction id and the same content
//! changes nothing; the same id with other content is refused.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    Aggregate, Currency, Money, Reason, Rejection, Violation, check_id,
    event::{command_enum, domain_events},
    invalid_if_any,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAccount {
    pub account_id: String,
    pub owner_id: String,
    pub currency: Currency,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepositMoney {
    pub transaction_id: String,
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WithdrawMoney {
    pub transaction_id: String,
    pub amount: Money,
}

/// Ask for a transfer from this account, carried out by the money
/// transfer saga (withdraw, deposit, refund when the deposit is refused).
/// Moves no money itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestTransfer {
    pub transfer_id: String,
    pub to_account_id: String,
    pub amount: Money,
}

/// Debit the source side of a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendTransfer {
    pub transfer_id: String,
    pub to_account_id: String,
    pub amount: Money,
}

/// Credit the target side of a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveTransfer {
    pub transfer_id: String,
    pub from_account_id: String,
    pub amount: Money,
}

/// Give a sent transfer back to the source (its target refused it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundTransfer {
    pub transfer_id: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseAccount;

command_enum! {
    pub enum AccountCommand {
        Open(OpenAccount),
        Deposit(DepositMoney),
        Withdraw(WithdrawMoney),
        Request(RequestTransfer),
        Send(SendTransfer),
        Receive(ReceiveTransfer),
        Refund(RefundTransfer),
        Close(CloseAccount),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountOpened {
    pub account_id: String,
    pub owner_id: String,
    pub currency: Currency,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoneyDeposited {
    pub account_id: String,
    pub transaction_id: String,
    pub amount: Money,
    pub balance: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoneyWithdrawn {
    pub account_id: String,
    pub transaction_id: String,
    pub amount: Money,
    pub balance: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRequested {
    pub account_id: String,
    pub transfer_id: String,
    pub to_account_id: String,
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferSent {
    pub account_id: String,
    pub transfer_id: String,
    pub to_account_id: String,
    pub amount: Money,
    pub balance: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferReceived {
    pub account_id: String,
    pub transfer_id: String,
    pub from_account_id: String,
    pub amount: Money,
    pub balance: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRefunded {
    pub account_id: String,
    pub transfer_id: String,
    pub amount: Money,
    pub reason: String,
    pub balance: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountClosed {
    pub account_id: String,
}

domain_events! {
    pub enum AccountEvent {
        Opened(AccountOpened) = 1,
        Deposited(MoneyDeposited) = 1,
        Withdrawn(MoneyWithdrawn) = 1,
        TransferRequested(TransferRequested) = 1,
        TransferSent(TransferSent) = 1,
        TransferReceived(TransferReceived) = 1,
        TransferRefunded(TransferRefunded) = 1,
        Closed(AccountClosed) = 1,
    }
}

/// What a transaction id was used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Movement {
    Deposit(i64),
    Withdrawal(i64),
    TransferOut(i64),
    TransferIn(i64),
    Refund(i64),
    /// A transfer asked for (under `request:<transfer id>`).
    Request(i64),
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Account {
    pub id: String,
    pub owner_id: String,
    pub opened: bool,
    pub closed: bool,
    pub balance: Option<Money>,
    /// Movements by transaction (or transfer) id; refunds under
    /// `refund:<transfer id>`.
    pub movements: BTreeMap<String, Movement>,
}

fn check_amount(amount: &Money, violations: &mut Vec<Violation>) {
    if amount.minor <= 0 {
        violations.push(Violation::new("amount.minor", "must be positive"));
    }
}

impl Account {
    /// The balance, if the account is open.
    fn require_open(&self) -> Result<Money, Rejection> {
        if !self.opened {
            return Err(Rejection::rule(Reason::AccountNotFound, "the account does not exist"));
        }
        if self.closed {
            return Err(Rejection::rule(Reason::AccountClosed, "the account is closed"));
        }
        // Every open account has a balance; a state without one (which no
        // event sequence makes) is refused rather than trusted.
        self.balance.ok_or_else(|| Rejection::rule(Reason::AccountNotFound, "the account has no balance"))
    }

    /// The balance of an open account in the amount's currency.
    fn open_balance(&self, amount: Money) -> Result<Money, Rejection> {
        let balance = self.require_open()?;
        if balance.currency != amount.currency {
            return Err(Rejection::rule(
                Reason::CurrencyMismatch,
                format!("amount in {}, account in {}", amount.currency, balance.currency),
            ));
        }
        Ok(balance)
    }

    /// `Some(no events)` when `id` was already used for exactly `movement`
    /// (a retry), a rejection when it was used for something else.
    fn repeated(&self, id: &str, movement: Movement) -> Result<bool, Rejection> {
        match self.movements.get(id) {
            None => Ok(false),
            Some(seen) if *seen == movement => Ok(true),
            Some(seen) => Err(Rejection::rule(
                Reason::DuplicateTransaction,
                format!("transaction {id} was already used for {seen:?}"),
            )),
        }
    }

    fn debit(balance: Money, amount: Money) -> Result<Money, Rejection> {
        if amount.minor > balance.minor {
            return Err(Rejection::rule(
                Reason::InsufficientFunds,
                format!("{} requested, balance {}", amount.minor, balance.minor),
            ));
        }
        balance.checked_sub(amount).map_err(|e| Rejection::rule(Reason::AmountOverflow, e.to_string()))
    }

    fn credit(balance: Money, amount: Money) -> Result<Money, Rejection> {
        balance.checked_add(amount).map_err(|e| Rejection::rule(Reason::AmountOverflow, e.to_string()))
    }
}

impl Aggregate for Account {
    const CATEGORY: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;

    fn creates(command: &AccountCommand) -> bool {
        matches!(command, AccountCommand::Open(_))
    }

    fn validate(command: &AccountCommand) -> Vec<Violation> {
        let mut violations = Vec::new();
        match command {
            AccountCommand::Open(c) => {
                check_id("account_id", &c.account_id, &mut violations);
                check_id("owner_id", &c.owner_id, &mut violations);
            }
            AccountCommand::Deposit(DepositMoney { transaction_id, amount })
            | AccountCommand::Withdraw(WithdrawMoney { transaction_id, amount }) => {
                check_id("transaction_id", transaction_id, &mut violations);
                check_amount(amount, &mut violations);
            }
            AccountCommand::Request(RequestTransfer { transfer_id, to_account_id, amount })
            | AccountCommand::Send(SendTransfer { transfer_id, to_account_id, amount }) => {
                check_id("transfer_id", transfer_id, &mut violations);
                check_id("to_account_id", to_account_id, &mut violations);
                check_amount(amount, &mut violations);
            }
            AccountCommand::Receive(c) => {
                check_id("transfer_id", &c.transfer_id, &mut violations);
                check_id("from_account_id", &c.from_account_id, &mut violations);
                check_amount(&c.amount, &mut violations);
            }
            AccountCommand::Refund(c) => {
                check_id("transfer_id", &c.transfer_id, &mut violations);
                crate::check_text("reason", &c.reason, 500, &mut violations);
            }
            AccountCommand::Close(CloseAccount) => {}
        }
        violations
    }

    fn decide(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, Rejection> {
        invalid_if_any(Self::validate(command))?;
        let account_id = self.id.clone();
        let event = match command {
            AccountCommand::Open(c) => {
                if self.opened {
                    return Err(Rejection::rule(Reason::AccountAlreadyExists, format!("account {} exists", self.id)));
                }
                AccountOpened { account_id: c.account_id.clone(), owner_id: c.owner_id.clone(), currency: c.currency }
                    .into()
            }
            AccountCommand::Deposit(c) => {
                let balance = self.open_balance(c.amount)?;
                if self.repeated(&c.transaction_id, Movement::Deposit(c.amount.minor))? {
                    return Ok(vec![]);
                }
                let balance = Self::credit(balance, c.amount)?;
                MoneyDeposited { account_id, transaction_id: c.transaction_id.clone(), amount: c.amount, balance }
                    .into()
            }
            AccountCommand::Withdraw(c) => {
                let balance = self.open_balance(c.amount)?;
                if self.repeated(&c.transaction_id, Movement::Withdrawal(c.amount.minor))? {
                    return Ok(vec![]);
                }
                let balance = Self::debit(balance, c.amount)?;
                MoneyWithdrawn { account_id, transaction_id: c.transaction_id.clone(), amount: c.amount, balance }
                    .into()
            }
            AccountCommand::Request(c) => {
                self.open_balance(c.amount)?;
                if c.to_account_id == self.id {
                    return Err(Rejection::rule(Reason::SameAccountTransfer, "source and target are the same account"));
                }
                if self.repeated(&format!("request:{}", c.transfer_id), Movement::Request(c.amount.minor))? {
                    return Ok(vec![]);
                }
                TransferRequested {
                    account_id,
                    transfer_id: c.transfer_id.clone(),
                    to_account_id: c.to_account_id.clone(),
                    amount: c.amount,
                }
                .into()
            }
            AccountCommand::Send(c) => {
                let balance = self.open_balance(c.amount)?;
                if c.to_account_id == self.id {
                    return Err(Rejection::rule(Reason::SameAccountTransfer, "source and target are the same account"));
                }
                if self.repeated(&c.transfer_id, Movement::TransferOut(c.amount.minor))? {
                    return Ok(vec![]);
                }
                let balance = Self::debit(balance, c.amount)?;
                TransferSent {
                    account_id,
                    transfer_id: c.transfer_id.clone(),
                    to_account_id: c.to_account_id.clone(),
                    amount: c.amount,
                    balance,
                }
                .into()
            }
            AccountCommand::Receive(c) => {
                let balance = self.open_balance(c.amount)?;
                if c.from_account_id == self.id {
                    return Err(Rejection::rule(Reason::SameAccountTransfer, "source and target are the same account"));
                }
                if self.repeated(&c.transfer_id, Movement::TransferIn(c.amount.minor))? {
                    return Ok(vec![]);
                }
                let balance = Self::credit(balance, c.amount)?;
                TransferReceived {
                    account_id,
                    transfer_id: c.transfer_id.clone(),
                    from_account_id: c.from_account_id.clone(),
                    amount: c.amount,
                    balance,
                }
                .into()
            }
            AccountCommand::Refund(c) => {
                let balance = self.require_open()?;
                let Some(Movement::TransferOut(minor)) = self.movements.get(&c.transfer_id).copied() else {
                    return Err(Rejection::rule(
                        Reason::TransferNotFound,
                        format!("no transfer {} was sent from this account", c.transfer_id),
                    ));
                };
                let amount = Money::new(minor, balance.currency);
                if self.repeated(&format!("refund:{}", c.transfer_id), Movement::Refund(minor))? {
                    return Ok(vec![]);
                }
                let balance = Self::credit(balance, amount)?;
                TransferRefunded {
                    account_id,
                    transfer_id: c.transfer_id.clone(),
                    amount,
                    reason: c.reason.clone(),
                    balance,
                }
                .into()
            }
            AccountCommand::Close(CloseAccount) => {
                let balance = self.require_open()?;
                if balance.minor != 0 {
                    return Err(Rejection::rule(
                        Reason::AccountNotEmpty,
                        format!("the balance is {}: withdraw it first", balance.minor),
                    ));
                }
                AccountClosed { account_id }.into()
            }
        };
        Ok(vec![event])
    }

    fn evolve(mut self, event: &AccountEvent) -> Self {
        match event {
            AccountEvent::Opened(e) => {
                self.id = e.account_id.clone();
                self.owner_id = e.owner_id.clone();
                self.opened = true;
                self.balance = Some(Money::zero(e.currency));
            }
            AccountEvent::Deposited(e) => {
                self.balance = Some(e.balance);
                self.movements.insert(e.transaction_id.clone(), Movement::Deposit(e.amount.minor));
            }
            AccountEvent::Withdrawn(e) => {
                self.balance = Some(e.balance);
                self.movements.insert(e.transaction_id.clone(), Movement::Withdrawal(e.amount.minor));
            }
            AccountEvent::TransferRequested(e) => {
                self.movements.insert(format!("request:{}", e.transfer_id), Movement::Request(e.amount.minor));
            }
            AccountEvent::TransferSent(e) => {
                self.balance = Some(e.balance);
                self.movements.insert(e.transfer_id.clone(), Movement::TransferOut(e.amount.minor));
            }
            AccountEvent::TransferReceived(e) => {
                self.balance = Some(e.balance);
                self.movements.insert(e.transfer_id.clone(), Movement::TransferIn(e.amount.minor));
            }
            AccountEvent::TransferRefunded(e) => {
                self.balance = Some(e.balance);
                self.movements.insert(format!("refund:{}", e.transfer_id), Movement::Refund(e.amount.minor));
            }
            AccountEvent::Closed(_) => self.closed = true,
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Scenario;

    fn usd(minor: i64) -> Money {
        Money::new(minor, "USD".parse().unwrap())
    }

    #[test]
    fn a_transfer_request_moves_no_money_and_is_recorded_once() {
        let opened: AccountEvent =
            AccountOpened { account_id: "a".into(), owner_id: "u".into(), currency: "USD".parse().unwrap() }.into();
        let request = RequestTransfer { transfer_id: "t-1".into(), to_account_id: "b".into(), amount: usd(500) };
        let account = Account::default().evolve(&opened);
        let events = account.decide(&request.clone().into()).unwrap();
        assert_eq!(
            events,
            [AccountEvent::from(TransferRequested {
                account_id: "a".into(),
                transfer_id: "t-1".into(),
                to_account_id: "b".into(),
                amount: usd(500),
            })]
        );
        let account = account.evolve(&events[0]);
        assert_eq!(account.balance, Some(usd(0)), "nothing moved (even with nothing to send)");
        assert_eq!(account.decide(&request.clone().into()).unwrap(), [], "the same request again: nothing");
        let other = RequestTransfer { amount: usd(600), ..request.clone() };
        assert_eq!(account.decide(&other.into()).unwrap_err().reason(), Some(Reason::DuplicateTransaction));
        let to_self = RequestTransfer { to_account_id: "a".into(), transfer_id: "t-2".into(), ..request };
        assert_eq!(account.decide(&to_self.into()).unwrap_err().reason(), Some(Reason::SameAccountTransfer));
    }

    fn opened() -> AccountEvent {
        AccountOpened { account_id: "a-1".into(), owner_id: "u-1".into(), currency: "USD".parse().unwrap() }.into()
    }

    fn deposited(tx: &str, minor: i64, balance: i64) -> AccountEvent {
        MoneyDeposited {
            account_id: "a-1".into(),
            transaction_id: tx.into(),
            amount: usd(minor),
            balance: usd(balance),
        }
        .into()
    }

    fn withdrawn(tx: &str, minor: i64, balance: i64) -> AccountEvent {
        MoneyWithdrawn {
            account_id: "a-1".into(),
            transaction_id: tx.into(),
            amount: usd(minor),
            balance: usd(balance),
        }
        .into()
    }

    fn sent(minor: i64, balance: i64) -> AccountEvent {
        TransferSent {
            account_id: "a-1".into(),
            transfer_id: "t-1".into(),
            to_account_id: "a-2".into(),
            amount: usd(minor),
            balance: usd(balance),
        }
        .into()
    }

    fn deposit(tx: &str, minor: i64) -> DepositMoney {
        DepositMoney { transaction_id: tx.into(), amount: usd(minor) }
    }

    fn withdraw(tx: &str, minor: i64) -> WithdrawMoney {
        WithdrawMoney { transaction_id: tx.into(), amount: usd(minor) }
    }

    fn send(minor: i64) -> SendTransfer {
        SendTransfer { transfer_id: "t-1".into(), to_account_id: "a-2".into(), amount: usd(minor) }
    }

    fn receive(minor: i64) -> ReceiveTransfer {
        ReceiveTransfer { transfer_id: "t-1".into(), from_account_id: "a-2".into(), amount: usd(minor) }
    }

    fn refund() -> RefundTransfer {
        RefundTransfer { transfer_id: "t-1".into(), reason: "target closed".into() }
    }

    #[test]
    fn open_once() {
        let open = OpenAccount { account_id: "a-1".into(), owner_id: "u-1".into(), currency: "USD".parse().unwrap() };
        Scenario::<Account>::given_no_events().when(open.clone()).then_expect([opened()]);
        Scenario::<Account>::given([opened()]).when(open.clone()).then_reject(Reason::AccountAlreadyExists);
        Scenario::<Account>::given_no_events()
            .when(OpenAccount { owner_id: String::new(), ..open })
            .then_invalid(&["owner_id"]);
    }

    #[test]
    fn deposit_credits_and_is_idempotent_per_transaction() {
        Scenario::<Account>::given([opened()]).when(deposit("x-1", 500)).then_expect([deposited("x-1", 500, 500)]);
        Scenario::<Account>::given([opened(), deposited("x-1", 500, 500)])
            .when(deposit("x-1", 500))
            .then_expect::<AccountEvent>([]);
        Scenario::<Account>::given([opened(), deposited("x-1", 500, 500)])
            .when(deposit("x-1", 501))
            .then_reject(Reason::DuplicateTransaction);
        Scenario::<Account>::given_no_events().when(deposit("x-1", 1)).then_reject(Reason::AccountNotFound);
        Scenario::<Account>::given([opened()])
            .when(DepositMoney { transaction_id: "x".into(), amount: Money::new(1, "EUR".parse().unwrap()) })
            .then_reject(Reason::CurrencyMismatch);
        Scenario::<Account>::given([opened(), deposited("x-1", i64::MAX, i64::MAX)])
            .when(deposit("x-2", 1))
            .then_reject(Reason::AmountOverflow);
        Scenario::<Account>::given([opened()]).when(deposit("", 0)).then_invalid(&["transaction_id", "amount.minor"]);
    }

    #[test]
    fn withdraw_never_overdraws() {
        Scenario::<Account>::given([opened(), deposited("x-1", 500, 500)])
            .when(withdraw("x-2", 500))
            .then_expect([withdrawn("x-2", 500, 0)]);
        Scenario::<Account>::given([opened(), deposited("x-1", 500, 500)])
            .when(withdraw("x-2", 501))
            .then_reject(Reason::InsufficientFunds);
        Scenario::<Account>::given([opened(), deposited("x-1", 500, 500)])
            .when(withdraw("x-1", 100))
            .then_reject(Reason::DuplicateTransaction);
        Scenario::<Account>::given([opened(), AccountClosed { account_id: "a-1".into() }.into()])
            .when(withdraw("x-2", 1))
            .then_reject(Reason::AccountClosed);
        Scenario::<Account>::given([opened()]).when(withdraw("x-2", -1)).then_invalid(&["amount.minor"]);
        Scenario::<Account>::given_no_events().when(withdraw("x-2", 1)).then_reject(Reason::AccountNotFound);
        Scenario::<Account>::given([opened(), deposited("x-1", 500, 500)])
            .when(WithdrawMoney { transaction_id: "x-2".into(), amount: Money::new(1, "EUR".parse().unwrap()) })
            .then_reject(Reason::CurrencyMismatch);
        Scenario::<Account>::given([opened(), deposited("x-1", 500, 500), withdrawn("x-2", 500, 0)])
            .when(withdraw("x-2", 500))
            .then_expect::<AccountEvent>([]);
    }

    #[test]
    fn transfers_are_recorded_on_both_sides() {
        Scenario::<Account>::given([opened(), deposited("x-1", 500, 500)])
            .when(send(200))
            .then_expect([sent(200, 300)]);
        Scenario::<Account>::given([opened(), deposited("x-1", 500, 500)])
            .when(send(501))
            .then_reject(Reason::InsufficientFunds);
        Scenario::<Account>::given([opened(), deposited("x-1", 500, 500), sent(200, 300)])
            .when(send(200))
            .then_expect::<AccountEvent>([]);
        Scenario::<Account>::given([opened(), deposited("x-1", 500, 500)])
            .when(SendTransfer { to_account_id: "a-1".into(), ..send(1) })
            .then_reject(Reason::SameAccountTransfer);
        Scenario::<Account>::given([opened()]).when(receive(200)).then_expect([TransferReceived {
            account_id: "a-1".into(),
            transfer_id: "t-1".into(),
            from_account_id: "a-2".into(),
            amount: usd(200),
            balance: usd(200),
        }]);
        Scenario::<Account>::given([opened()])
            .when(ReceiveTransfer { from_account_id: "a-1".into(), ..receive(1) })
            .then_reject(Reason::SameAccountTransfer);
        Scenario::<Account>::given_no_events().when(receive(1)).then_reject(Reason::AccountNotFound);
        Scenario::<Account>::given_no_events().when(send(1)).then_reject(Reason::AccountNotFound);
        Scenario::<Account>::given([opened(), AccountClosed { account_id: "a-1".into() }.into()])
            .when(receive(1))
            .then_reject(Reason::AccountClosed);
        Scenario::<Account>::given([opened()])
            .when(ReceiveTransfer { amount: Money::new(1, "EUR".parse().unwrap()), ..receive(1) })
            .then_reject(Reason::CurrencyMismatch);
        Scenario::<Account>::given([
            opened(),
            TransferReceived {
                account_id: "a-1".into(),
                transfer_id: "t-1".into(),
                from_account_id: "a-2".into(),
                amount: usd(200),
                balance: usd(200),
            }
            .into(),
        ])
        .when(send(100))
        .then_reject(Reason::DuplicateTransaction);
        Scenario::<Account>::given([opened()])
            .when(SendTransfer { to_account_id: String::new(), ..send(0) })
            .then_invalid(&["to_account_id", "amount.minor"]);
        Scenario::<Account>::given([opened()])
            .when(ReceiveTransfer { from_account_id: String::new(), ..receive(1) })
            .then_invalid(&["from_account_id"]);
    }

    #[test]
    fn a_sent_transfer_is_refunded_once() {
        let refunded = TransferRefunded {
            account_id: "a-1".into(),
            transfer_id: "t-1".into(),
            amount: usd(200),
            reason: "target closed".into(),
            balance: usd(500),
        };
        Scenario::<Account>::given([opened(), deposited("x-1", 500, 500), sent(200, 300)])
            .when(refund())
            .then_expect([refunded.clone()]);
        Scenario::<Account>::given([opened(), deposited("x-1", 500, 500), sent(200, 300), refunded.into()])
            .when(refund())
            .then_expect::<AccountEvent>([]);
        Scenario::<Account>::given([opened(), deposited("x-1", 500, 500)])
            .when(refund())
            .then_reject(Reason::TransferNotFound);
        Scenario::<Account>::given_no_events().when(refund()).then_reject(Reason::AccountNotFound);
        Scenario::<Account>::given([opened()])
            .when(RefundTransfer { transfer_id: "t-1".into(), reason: String::new() })
            .then_invalid(&["reason"]);
    }

    #[test]
    fn close_only_when_empty() {
        Scenario::<Account>::given([opened()])
            .when(CloseAccount)
            .then_expect([AccountClosed { account_id: "a-1".into() }]);
        Scenario::<Account>::given([opened(), deposited("x-1", 1, 1)])
            .when(CloseAccount)
            .then_reject(Reason::AccountNotEmpty);
        Scenario::<Account>::given_no_events().when(CloseAccount).then_reject(Reason::AccountNotFound);
        Scenario::<Account>::given([opened(), AccountClosed { account_id: "a-1".into() }.into()])
            .when(CloseAccount)
            .then_reject(Reason::AccountClosed);
    }
}
