//! `bad-signature`: exports `run`, as the compute world does, but with other parameters, to
//! prove uploads are checked against the world's signatures (→ 422 before any compile).

wit_bindgen::generate!({
    inline: "
        package test:bad;
        world almost-compute {
            export run: func(count: u32) -> u32;
        }
    ",
});

struct Bad;

impl Guest for Bad {
    fn run(count: u32) -> u32 {
        count + 1
    }
}

export!(Bad);
