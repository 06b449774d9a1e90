//! `other-world`: a valid component of a world the host does not know, to prove uploads are
//! checked against the WIT worlds (→ 422), not just parsed.

wit_bindgen::generate!({
    inline: "
        package test:other;
        world greeter {
            export greet: func(name: string) -> string;
        }
    ",
});

struct Greeter;

impl Guest for Greeter {
    fn greet(name: String) -> String {
        format!("hello, {name}")
    }
}

export!(Greeter);
